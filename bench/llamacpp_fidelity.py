"""How close the large LM in llama.cpp is to the torch reference, and how much faster, on FedPT's own work.

    python bench/llamacpp_fidelity.py [--preset qwen-cpu] [--prompts 8] [--dtype auto] [--adapter DIR|random]
        [--out bench/results/llamacpp]

With ``--adapter``, the tuned large LM (fedavg-large's, as ``model.eval_engine = "llamacpp"``
evaluates it): torch runs the peft model, llama.cpp the GGUF plus the adapter exported to GGUF.

Both run the same weights: torch the GGUF dequantized into dense tensors (``model.dtype``),
llama.cpp the GGUF file itself (4-6-bit blocks; its quantized dot products round activations to
8 bits). On the preset's evaluation sets (held-out split and extra sets, each cut to its first
``--prompts``), with the preset's protocol (greedy, ``eval.max_new_tokens``, ``eval.batch_size``):

1. teacher-forced, prompt + reference response (cut to ``eval.max_new_tokens``): mean
   KL(p_torch || p_llama.cpp) over response positions, and how often the two argmaxes agree;
2. the large LM alone decoding each set greedily in each engine: Rouge-L, prompts with identical
   outputs, and wall seconds (prefill included), engines alternating set by set.

Prints a Markdown table and writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR, which MKL reads when torch loads it)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from topk_fidelity import decode_set, reference_batches  # noqa: E402  (the run's greedy protocol, Rouge-L as the run scores it)


def teacher_forced(cfg, tokenizer, sources: dict, eval_sets: dict) -> dict:
    kl_sum, agree, positions = 0.0, 0, 0
    for examples in eval_sets.values():
        # 4 rows: the (rows, T, 151936) fp32 logits stay under 1 GB
        for ids, mask, keep, select in reference_batches(cfg, tokenizer, examples, 4):
            logp = {name: torch.log_softmax(make().score(ids, mask, keep)[select], -1) for name, make in sources.items()}
            ref, eng = logp["torch"], logp["llama.cpp"]
            kl_sum += float((ref.exp() * (ref - eng)).sum())
            agree += int((ref.argmax(-1) == eng.argmax(-1)).sum())
            positions += len(ref)
    return {"positions": positions, "mean_kl": kl_sum / positions, "argmax_agreement": agree / positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen-cpu")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per evaluation set")
    parser.add_argument("--dtype", default="auto", help="torch reference dtype (default: the preset's auto)")
    parser.add_argument("--adapter", default="",
                        help="the tuned large LM (fedavg-large): a peft adapter folder of the large LM (e.g. a "
                             "run's fedavg-large/adapter), or 'random' for a seeded nonzero LoRA; torch runs peft, "
                             "llama.cpp the GGUF plus the adapter exported to GGUF (model.eval_engine = llamacpp)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_fidelity"))
    args = parser.parse_args()

    from fedpt.config import load_config
    from fedpt.models.llamacpp import LlamaCppModel, gguf_path
    from fedpt.models.loading import load_model, load_tokenizer, resolve_dtype
    from fedpt.models.logits import LocalLogitSource
    from fedpt.server import load_eval_sets, load_splits

    started = time.perf_counter()
    cfg = load_config(preset=args.preset, overrides=["model.large_backend=local", f"model.dtype={args.dtype}",
                                                     f"data.eval_sets_size={args.prompts}"])
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, protocol="greedy"))
    tokenizer = load_tokenizer(cfg.model.small)
    large = load_model(cfg.model.large, cfg.model.dtype)
    engine = LlamaCppModel(gguf_path(cfg.model.large))
    adapter = None
    if args.adapter:  # the tuned large LM as each engine evaluates it
        from fedpt.bench import with_random_lora

        if args.adapter == "random":
            large = with_random_lora(large, cfg.lora, scale=0.01)
        else:
            from peft import PeftModel

            large = PeftModel.from_pretrained(large, args.adapter).eval()
        adapter = engine.load_peft_adapter(large)
    sources = {"torch": lambda: LocalLogitSource(large), "llama.cpp": lambda: engine.source(adapter)}
    eval_sets = {name: examples[: args.prompts] for name, examples in load_eval_sets(cfg, load_splits(cfg)).items()}

    forced = teacher_forced(cfg, tokenizer, sources, eval_sets)
    print(f"teacher-forced: {json.dumps(forced)}", flush=True)
    decoding = {name: {"rouge": {}, "seconds": 0.0, "tokens": 0} for name in sources}
    identical = 0
    for set_name, examples in eval_sets.items():
        outputs = {}
        for name, make in sources.items():
            ids, rouge, seconds = decode_set(make(), tokenizer, examples, cfg)
            outputs[name] = ids
            decoding[name]["rouge"][set_name] = rouge
            decoding[name]["seconds"] += seconds
            decoding[name]["tokens"] += sum(map(len, ids))
        identical += sum(a == b for a, b in zip(outputs["torch"], outputs["llama.cpp"]))
        print(f"{set_name}: " + ", ".join(f"{n} Rouge-L {d['rouge'][set_name]:.2f}" for n, d in decoding.items()),
              flush=True)
    result = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "large": cfg.model.large + (f" + adapter {args.adapter}" if args.adapter else ""),
              "gguf": str(engine.path), "torch_dtype": resolve_dtype(cfg.model.dtype),
              "threads": torch.get_num_threads(), "eval_sets": {n: len(e) for n, e in eval_sets.items()},
              "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
              "teacher_forced": forced, "decoding": decoding, "identical_outputs": identical,
              "prompts": sum(len(e) for e in eval_sets.values()),
              "seconds": time.perf_counter() - started, "load_average_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def to_markdown(r: dict) -> str:
    sets = list(r["eval_sets"])
    lines = [f"`{r['command']}` ({r['date']}); large `{r['large']}`; torch in {r['torch_dtype']}, "
             f"{r['threads']} threads; greedy, {r['max_new_tokens']} new tokens, batch {r['batch_size']}; "
             f"load average at the end {r['load_average_at_end'][0]:.1f}.", "",
             f"Teacher-forced on {r['teacher_forced']['positions']} reference-response positions: mean "
             f"KL(torch ‖ llama.cpp) **{r['teacher_forced']['mean_kl']:.4f}**, argmax agreement "
             f"**{100 * r['teacher_forced']['argmax_agreement']:.1f}%**.", "",
             "| engine | " + " | ".join(f"Rouge-L {s} ({r['eval_sets'][s]})" for s in sets)
             + " | tokens | seconds | tok/s |", "|---" * (len(sets) + 4) + "|"]
    for name, d in r["decoding"].items():
        lines.append(f"| {name} | " + " | ".join(f"{d['rouge'][s]:.2f}" for s in sets)
                     + f" | {d['tokens']} | {d['seconds']:.0f} | {d['tokens'] / d['seconds']:.2f} |")
    speedup = (r["decoding"]["torch"]["seconds"] / r["decoding"]["llama.cpp"]["seconds"])
    lines += ["", f"Identical greedy outputs: {r['identical_outputs']}/{r['prompts']}; llama.cpp takes "
              f"{1 / speedup:.2f}× torch's wall time for the same sets."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
