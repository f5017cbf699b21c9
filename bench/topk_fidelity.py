"""How much proxy-tuning through a top-k log-probability API loses against full logits, and what it costs.

    python bench/topk_fidelity.py --run RUN_DIR [--system fedpt] [--ks 5,20,100] [--prompts 16]
        [--speed-prompts 2] [--speed-tokens 16] [--server fedpt|llama-cpp-python] [--out runs/topk-fidelity]

RUN_DIR is a finished ``fedpt run`` (its ``config.toml`` and ``<system>/adapter``). Two parts:

1. Quality, on the run's evaluation sets (the source's held-out split as the run used it, the
   extra sets; each cut to its first ``--prompts``), greedy, the run's ``eval.max_new_tokens``: the
   proxy-tuned large LM decoded with full logits and with the large LM's logits restricted to
   its top-k (``TopKRestricted``: what a server returning k log-probs shows, at local KV-cache
   speed; tests/test_openai_topk.py checks that the real API path gives the same tokens).
   Reported per k: Rouge-L per set, prompts with output identical to full logits, and, on every
   position of the full-logits trajectories, the mean KL(p_topk || p_full) = -log p_full(S_k),
   the mean proxy mass outside S_k, and how often the greedy choice is the same.
2. Speed: proxy-tuned greedy decoding at batch 1 through ``OpenAITopKSource`` against a real
   ``fedpt serve --model <large>`` process on 127.0.0.1 (each k of ``--ks``), divided by the
   same decoding with the local backend, same prompts, interleaved. The stateless API resends
   every sequence each step, so this ratio falls as sequences grow. ``--server llama-cpp-python``
   runs llama-cpp-python's own server on the large model's GGUF instead (text prompts only); the
   Rouge-L of the API's outputs is reported next to the offline top-k's.

Prints a Markdown table and writes ``topk_fidelity.json`` and ``topk_fidelity.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR, which MKL reads when torch loads it)
import torch


class FullProxyRecorder:
    """The full-logits proxy as a LogitSource that also measures, at every position it produces
    for a still-running row, what restricting the large LM to its top-k would change."""

    def __init__(self, large, diff, alpha: float, ks: list[int], eos_ids: list[int]) -> None:
        self.large, self.diff, self.alpha, self.ks = large, diff, alpha, ks
        self.eos = torch.tensor(eos_ids)
        self.stats = {k: {"kl": 0.0, "mass_out": 0.0, "greedy_same": 0} for k in ks}
        self.positions = 0
        self._alive: torch.Tensor | None = None

    def _record(self, z_large: torch.Tensor, z_diff: torch.Tensor) -> torch.Tensor:
        from fedpt.proxy import proxy_logits

        proxy = proxy_logits(z_large, z_diff, self.alpha)
        rows = self._alive
        logp = torch.log_softmax(proxy[rows], dim=-1)  # (N, V) full proxy
        greedy = logp.argmax(-1)
        self.positions += int(rows.sum())
        for k in self.ks:
            top = z_large[rows].float().topk(k, dim=-1).indices  # S_k: the large LM's top-k
            log_mass = torch.logsumexp(logp.gather(-1, top), dim=-1)  # log p_full(S_k)
            restricted_greedy = top.gather(-1, logp.gather(-1, top).argmax(-1, keepdim=True))[:, 0]
            self.stats[k]["kl"] += float(-log_mass.sum())
            self.stats[k]["mass_out"] += float((1 - log_mass.exp()).sum())
            self.stats[k]["greedy_same"] += int((restricted_greedy == greedy).sum())
        return proxy

    def prefill(self, input_ids, attention_mask):
        self._alive = torch.ones(len(input_ids), dtype=torch.bool)
        return self._record(self.large.prefill(input_ids, attention_mask), self.diff.prefill(input_ids, attention_mask))

    def step(self, tokens):
        self._alive = self._alive & ~torch.isin(tokens, self.eos)
        return self._record(self.large.step(tokens), self.diff.step(tokens))

    def close(self):
        for part in (self.large, self.diff):
            part.close()

    def summary(self) -> dict[int, dict[str, float]]:
        n = max(self.positions, 1)
        return {k: {"kl": s["kl"] / n, "mass_out": s["mass_out"] / n, "greedy_agreement": s["greedy_same"] / n}
                for k, s in self.stats.items()}


def decode_set(source, tokenizer, examples, cfg) -> tuple[list[list[int]], float, float]:
    """Greedy ids per prompt, mean Rouge-L, seconds: exactly the run's evaluation protocol (greedy)."""
    from fedpt.data.prompts import format_prompt
    from fedpt.evaluate import rouge_l
    from fedpt.proxy import Decoding, generate_ids

    prompts = [format_prompt(ex, cfg.data.template, tokenizer) for ex in examples]
    start = time.perf_counter()
    ids = generate_ids(source, tokenizer, prompts, Decoding(max_new_tokens=cfg.eval.max_new_tokens),
                       cfg.eval.batch_size, cfg.data.max_prompt_tokens)
    seconds = time.perf_counter() - start
    answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    rouge = sum(rouge_l(a, ex.all_references) for a, ex in zip(answers, examples)) / len(examples)
    return ids, rouge, seconds


def speed(cfg, tokenizer, large, small, vocab_size: int, examples, ks: list[int], prompts: int, tokens: int,
          out: Path, server: str = "fedpt") -> dict:
    """Tokens/s at batch 1: the OpenAI top-k backend on a real server, per k, ÷ the local backend
    (full logits, KV cache); same prompts, interleaved per prompt. Also checks that the API's tokens
    equal the offline top-k restriction's, and scores both. ``server``: ``fedpt`` (``fedpt serve
    --model``, token ids) or ``llama-cpp-python`` (``python -m llama_cpp.server`` on the large
    model's GGUF file: text prompts only, one per request)."""
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.models.openai_topk import OpenAITopKSource, TopKRestricted
    from fedpt.proxy import ProxyTunedLM
    from fedpt.serving.launch import launch, launch_llama_cpp_server

    speed_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=tokens, batch_size=1))
    alpha = cfg.proxy.alpha
    if server == "llama-cpp-python":
        from fedpt.models.llamacpp import gguf_path

        served = launch_llama_cpp_server(gguf_path(cfg.model.large), threads=torch.get_num_threads(),
                                         log=out / "llama-cpp-server.log")
    else:
        served = launch(["--model", cfg.model.large, "--dtype", cfg.model.dtype, "--max-logprobs",
                         str(max(max(ks), 1))], log=out / "serve.log")
    url = served.url + "/v1"
    local = {"seconds": 0.0, "tokens": 0, "rouge": 0.0}
    per_k = {k: {"seconds": 0.0, "tokens": 0, "same": 0, "rouge": 0.0, "rouge_offline": 0.0} for k in ks}
    sources = {}
    try:
        sources = {k: OpenAITopKSource(url, "", k, tokenizer, vocab_size) for k in ks}
        for example in examples[:prompts]:
            ids, rouge, sec = decode_set(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(small), alpha),
                                         tokenizer, [example], speed_cfg)
            local["seconds"] += sec
            local["tokens"] += len(ids[0])
            local["rouge"] += rouge
            for k in ks:
                ids_api, rouge, sec = decode_set(ProxyTunedLM(sources[k].fork(), MixedAdapterDiff(small), alpha),
                                                 tokenizer, [example], speed_cfg)
                ids_off, rouge_off, _ = decode_set(ProxyTunedLM(TopKRestricted(LocalLogitSource(large), k),
                                                                MixedAdapterDiff(small), alpha), tokenizer, [example],
                                                   speed_cfg)
                per_k[k]["seconds"] += sec
                per_k[k]["tokens"] += len(ids_api[0])
                per_k[k]["same"] += ids_api == ids_off
                per_k[k]["rouge"] += rouge
                per_k[k]["rouge_offline"] += rouge_off
    finally:
        served.stop(timeout=120)
    local_rate = local["tokens"] / local["seconds"]
    n = len(examples[:prompts])
    return {"server": server, "prompts": prompts, "max_new_tokens": tokens, "local_tokens_per_s": local_rate,
            "local_rouge_l": local["rouge"] / n,
            "per_k": {k: {"tokens_per_s": v["tokens"] / v["seconds"], "ratio": v["tokens"] / v["seconds"] / local_rate,
                          "api_equals_offline_topk": f"{v['same']}/{prompts}", "rouge_l_api": v["rouge"] / n,
                          "rouge_l_offline_topk": v["rouge_offline"] / n, "requests": sources[k].stats.requests,
                          "prompt_tokens_sent": sources[k].stats.prompt_tokens, "unmapped": sources[k].stats.unmapped,
                          "retokenized": sources[k].stats.retokenized, "refetched": sources[k].stats.refetched,
                          "token_ids_extension": sources[k].token_ids_extension,
                          "token_id_prompts": sources[k].traits.id_prompts}
                      for k, v in per_k.items()}}


def reference_batches(cfg, tokenizer, examples, rows: int):
    """Left-padded batches of prompt + reference response (cut to ``eval.max_new_tokens``), with
    ``keep`` (positions to score from the end) and ``select`` (which of those predict a response
    token): the positions a teacher-forced comparison of two next-token distributions uses."""
    from fedpt.data.prompts import IGNORE_INDEX, collate, encode_prompt, format_prompt

    for start in range(0, len(examples), rows):
        pairs, longest = [], 0
        for ex in examples[start: start + rows]:
            prompt = encode_prompt(tokenizer, format_prompt(ex, cfg.data.template, tokenizer), cfg.data.max_prompt_tokens)
            response = tokenizer(ex.response, add_special_tokens=False)["input_ids"][: cfg.eval.max_new_tokens]
            pairs.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
            longest = max(longest, len(response))
        batch = collate(pairs, tokenizer.pad_token_id, left=True)
        next_labels = torch.full_like(batch["labels"], IGNORE_INDEX)
        next_labels[:, :-1] = batch["labels"][:, 1:]  # position t predicts token t+1
        keep = longest + 1
        yield batch["input_ids"], batch["attention_mask"], keep, next_labels[:, -keep:] != IGNORE_INDEX


def teacher_forced(cfg, tokenizer, large, small, eval_sets, ks: list[int]) -> dict:
    """The cheap variant (``--teacher-forced``): one scoring pass over prompt + reference response
    (cut to ``eval.max_new_tokens``), no decoding: KL, mass outside S_k and greedy agreement at
    every response position. For machines too busy for the decoding runs."""
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff

    recorder = FullProxyRecorder(None, None, cfg.proxy.alpha, ks, [])
    for examples in eval_sets.values():
        for ids, mask, keep, select in reference_batches(cfg, tokenizer, examples, cfg.eval.batch_size):
            z_large = LocalLogitSource(large).score(ids, mask, keep)[select]
            z_diff = MixedAdapterDiff(small).score(ids, mask, keep)[select]
            recorder._alive = torch.ones(len(z_large), dtype=torch.bool)
            recorder._record(z_large, z_diff)
    return {"positions": recorder.positions, "per_k": recorder.summary()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--system", default="fedpt")
    parser.add_argument("--ks", default="5,20,100")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per evaluation set (at most the run's)")
    parser.add_argument("--speed-prompts", type=int, default=2)
    parser.add_argument("--speed-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/topk-fidelity"))
    parser.add_argument("--speed-only", action="store_true",
                        help="only the tokens/s part (writes topk_speed.json): e.g. after a server change")
    parser.add_argument("--server", choices=("fedpt", "llama-cpp-python"), default="fedpt",
                        help="the top-k server of the speed part: fedpt serve --model, or llama-cpp-python's own "
                             "(python -m llama_cpp.server on the large model's GGUF; pip install 'fedpt[llamacpp]')")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="only KL / mass / agreement on reference responses (one scoring pass, no decoding)")
    args = parser.parse_args()

    from peft import PeftModel

    from fedpt.config import load_config
    from fedpt.models.loading import load_model, load_tokenizer
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.models.openai_topk import TopKRestricted
    from fedpt.proxy import ProxyTunedLM, stop_token_ids
    from fedpt.server import load_eval_sets, load_splits

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(path=args.run / "config.toml")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, protocol="greedy"),
                              data=dataclasses.replace(cfg.data, eval_sets_size=args.prompts))
    ks = [int(k) for k in args.ks.split(",")]
    tokenizer = load_tokenizer(cfg.model.small)
    small = PeftModel.from_pretrained(load_model(cfg.model.small, cfg.model.dtype), args.run / args.system / "adapter")
    large = load_model(cfg.model.large, cfg.model.dtype)
    vocab_size = small.get_output_embeddings().weight.shape[0]
    # The run's sets, each cut to its first --prompts (stratified order: one per category first).
    eval_sets = {name: examples[: args.prompts] for name, examples in load_eval_sets(cfg, load_splits(cfg)).items()}
    alpha = cfg.proxy.alpha

    if args.speed_only:
        result = {"run": str(args.run), "models": [cfg.model.small, cfg.model.large], "dtype": cfg.model.dtype,
                  "speed": speed(cfg, tokenizer, large, small, vocab_size, next(iter(eval_sets.values())), ks,
                                 args.speed_prompts, args.speed_tokens, args.out, args.server),
                  "seconds": time.perf_counter() - started, "load_average_at_end": os.getloadavg()}
        (args.out / "topk_speed.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    if args.teacher_forced:
        result = {"run": str(args.run), "models": [cfg.model.small, cfg.model.large], "dtype": cfg.model.dtype,
                  "alpha": alpha, "eval_sets": {n: len(e) for n, e in eval_sets.items()},
                  "max_response_tokens": cfg.eval.max_new_tokens,
                  "teacher_forced": teacher_forced(cfg, tokenizer, large, small, eval_sets, ks),
                  "seconds": time.perf_counter() - started, "load_average_at_end": os.getloadavg()}
        (args.out / "topk_teacher_forced.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return
    rows: dict[str, dict] = {"full": {"rouge": {}, "identical": 0, "tokens": 0, "seconds": 0.0}}
    rows |= {f"top-{k}": {"rouge": {}, "identical": 0, "tokens": 0, "seconds": 0.0} for k in ks}
    recorder = None
    for name, examples in eval_sets.items():
        recorder = FullProxyRecorder(LocalLogitSource(large), MixedAdapterDiff(small), alpha, ks,
                                     stop_token_ids(tokenizer))
        full_ids, rouge, seconds = decode_set(recorder, tokenizer, examples, cfg)
        rows["full"]["rouge"][name] = rouge
        rows["full"]["tokens"] += sum(map(len, full_ids))
        rows["full"]["seconds"] += seconds
        rows["full"]["identical"] += len(examples)
        for k, stats in recorder.summary().items():
            row = rows[f"top-{k}"]
            for key, value in stats.items():  # weighted by positions, summed over sets
                row.setdefault(f"{key}_sum", 0.0)
                row[f"{key}_sum"] += value * recorder.positions
            row.setdefault("positions", 0)
            row["positions"] += recorder.positions
        for k in ks:
            source = ProxyTunedLM(TopKRestricted(LocalLogitSource(large), k), MixedAdapterDiff(small), alpha)
            ids, rouge, seconds = decode_set(source, tokenizer, examples, cfg)
            row = rows[f"top-{k}"]
            row["rouge"][name] = rouge
            row["identical"] += sum(a == b for a, b in zip(ids, full_ids))
            row["tokens"] += sum(map(len, ids))
            row["seconds"] += seconds
        print(f"{name}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    for k in ks:
        row = rows[f"top-{k}"]
        for key in ("kl", "mass_out", "greedy_agreement"):
            row[key] = row.pop(f"{key}_sum") / max(row["positions"], 1)
    sizes = {name: len(examples) for name, examples in eval_sets.items()}

    def save(speed_result: dict | None) -> str:
        result = {"run": str(args.run), "system": args.system, "models": [cfg.model.small, cfg.model.large],
                  "dtype": cfg.model.dtype, "alpha": alpha, "max_new_tokens": cfg.eval.max_new_tokens,
                  "eval_sets": sizes, "rows": rows, "speed": speed_result,
                  "seconds": time.perf_counter() - started, "cpus": os.cpu_count(),
                  "load_average_at_end": os.getloadavg()}
        (args.out / "topk_fidelity.json").write_text(json.dumps(result, indent=2))
        markdown = to_markdown(result)
        (args.out / "topk_fidelity.md").write_text(markdown)
        return markdown

    print(save(None), flush=True)  # the quality part, in case the speed part is cut short
    speed_result = None
    if args.speed_prompts:
        speed_result = speed(cfg, tokenizer, large, small, vocab_size, next(iter(eval_sets.values())),
                             ks, args.speed_prompts, args.speed_tokens, args.out, args.server)

    print(save(speed_result))


def to_markdown(result: dict) -> str:
    sets = list(result["eval_sets"])
    speed = result.get("speed") or {}
    header = "| large LM logits | " + " | ".join(f"Rouge-L {s} ({result['eval_sets'][s]})" for s in sets)
    header += (" | outputs = full | mean KL(p_topk ‖ p_full) | proxy mass outside top-k | greedy agreement"
               " | tokens/s, batch 1 (÷ local) |")
    lines = [header, "|" + "---|" * (len(sets) + 6)]
    total = sum(result["eval_sets"].values())
    for name, row in result["rows"].items():
        rouge = " | ".join(f"{row['rouge'][s]:.2f}" for s in sets)
        if name == "full":
            rate = f"{speed['local_tokens_per_s']:.2f} (local backend)" if speed else "—"
            lines.append(f"| full | {rouge} | — | — | — | — | {rate} |")
            continue
        k = int(name.removeprefix("top-"))
        api = (speed.get("per_k") or {}).get(k) or (speed.get("per_k") or {}).get(str(k))
        rate = f"{api['tokens_per_s']:.2f} ({api['ratio']:.2f})" if api else "—"
        lines.append(f"| {name} | {rouge} | {row['identical']}/{total} | {row['kl']:.4f} | {row['mass_out']:.4f} | "
                     f"{100 * row['greedy_agreement']:.1f}% | {rate} |")
    positions = result["rows"][next(n for n in result["rows"] if n != "full")]["positions"]
    notes = [f"\nModels {result['models'][0]} → {result['models'][1]} ({result['dtype']}), α = {result['alpha']}, "
             f"greedy, max_new_tokens = {result['max_new_tokens']}. Top-k rows decode with the large LM's logits "
             f"restricted to its top-k locally (`TopKRestricted`); KL, mass and agreement on the {positions} positions "
             f"of the full-logits outputs. {result['seconds'] / 60:.1f} min on {result['cpus']} shared cores (busy "
             f"machine: load average {result['load_average_at_end'][1]:.1f} at the end)."]
    if speed:
        checks = ", ".join(f"top-{k}: {v['api_equals_offline_topk']}" for k, v in speed["per_k"].items())
        sent = ", ".join(f"top-{k}: {v['requests']} requests / {v['prompt_tokens_sent']} prompt tokens"
                         for k, v in speed["per_k"].items())
        notes.append(f"Tokens/s: proxy-tuned greedy decoding at batch 1, {speed['prompts']} prompts × up to "
                     f"{speed['max_new_tokens']} tokens, through `OpenAITopKSource` against a real "
                     f"{'`python -m llama_cpp.server`' if speed.get('server') == 'llama-cpp-python' else '`fedpt serve`'} "
                     f"on 127.0.0.1 ÷ the local backend (same prompts, interleaved). API outputs equal the offline "
                     f"top-k ones on {checks}. Sent: {sent} (the stateless API resends every sequence each step).")
    return "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


if __name__ == "__main__":
    main()
