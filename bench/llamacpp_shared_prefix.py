"""What computing a shared prompt prefix once saves in a real evaluation, and that it changes nothing.

    python bench/llamacpp_shared_prefix.py [--preset paper-cpu] [--model qwen2.5-coder-1.5b-instruct]
                                           [--prompts 24] [--repeats 1] [--out bench/results/llamacpp_shared_prefix]

``LlamaCppLogitSource.prefill`` computes a prefix that several rows of a batch open with (the
prompt template's header, an S-NI task definition) once and copies its KV stream to the other
rows (``FEDPT_LLAMACPP_SHARE_PREFIX``). This evaluates the first ``--prompts`` prompts of each of the preset's
evaluation sets with the model's GGUF in llama.cpp, sharing on and off, interleaved in one
process (best of ``--repeats``), at the preset's batch size and decoding settings, and prints
per set: seconds each way, the speed-up, Rouge-L each way and how many greedy outputs are
identical. Writes ``OUT.json`` and ``OUT.md`` (with the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR)
import torch


def main() -> None:
    from fedpt.config import load_config
    from fedpt.cpu import cpu_summary
    from fedpt.evaluate import evaluate_rouge
    from fedpt.models.llamacpp import SHARE_PREFIX_ENV, LlamaCppModel, gguf_path
    from fedpt.models.loading import load_tokenizer
    from fedpt.server import load_eval_sets, load_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-cpu")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_shared_prefix"))
    args = parser.parse_args()

    cfg = load_config(preset=args.preset)
    tokenizer = load_tokenizer(cfg.model.small)
    sets = {name: examples[:args.prompts] for name, examples in load_eval_sets(cfg, load_splits(cfg)).items()}
    model = LlamaCppModel(gguf_path(args.model), threads=args.threads)
    rows = []
    for name, examples in sets.items():
        best: dict[bool, float] = {}
        results = {}
        for _ in range(args.repeats):
            for share in (True, False):  # interleaved: drift on a shared machine hits both
                os.environ[SHARE_PREFIX_ENV] = "on" if share else "off"
                source = model.source()
                start = time.perf_counter()
                results[share] = evaluate_rouge(source, tokenizer, examples, cfg.eval, cfg.data)
                best[share] = min(best.get(share, float("inf")), time.perf_counter() - start)
                source.close()
        same = sum(a == b for a, b in zip(results[True].predictions[0], results[False].predictions[0]))
        rows.append({"set": name, "prompts": len(examples), "seconds_shared": best[True],
                     "seconds_unshared": best[False], "speedup": best[False] / best[True],
                     "rouge_l_shared": results[True].rouge_l, "rouge_l_unshared": results[False].rouge_l,
                     "identical_outputs": same})
        print(json.dumps(rows[-1]), flush=True)
    report = {"cpu": cpu_summary(), "threads": args.threads, "model": args.model, "preset": args.preset,
              "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens, "rows": rows}
    lines = [f"CPU: {report['cpu']}; {args.threads} threads; {args.model} in llama.cpp; preset {args.preset} "
             f"(batch {cfg.eval.batch_size}, {cfg.eval.max_new_tokens} new tokens); best of {args.repeats}", "",
             "| set | prompts | s, shared prefix | s, unshared | speed-up | Rouge-L shared | Rouge-L unshared | "
             "identical outputs |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['prompts']} | {r['seconds_shared']:.1f} | {r['seconds_unshared']:.1f} | "
              f"{r['speedup']:.2f}x | {r['rouge_l_shared']:.2f} | {r['rouge_l_unshared']:.2f} | "
              f"{r['identical_outputs']}/{r['prompts']} |" for r in rows]
    print("\n".join(lines))
    from fedpt.bench import write_results

    write_results(args.out, report, lines, show=False)


if __name__ == "__main__":
    main()
