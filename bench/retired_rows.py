"""Finished rows left out of llama.cpp's decoding steps (``retire_rows``) vs kept in, side by side.

    python bench/retired_rows.py [--model large|small] [--repeats 2] [--out bench/results/retired_rows]

Evaluates the qwen-cpu preset's evaluation sets (3 x 8 prompts, one packed batch of 24, greedy,
48 new tokens) with the pretrained LM in llama.cpp, once with retiring on (the default) and once
with ``LlamaCppLogitSource.retire_rows`` made a no-op, alternating, best of ``--repeats``.
Prints seconds, the speed-up, Rouge-L and how many outputs are identical (the active rows'
batch shape changes when rows leave, so llama.cpp may round differently), with the CPU named.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR)


def main() -> None:
    from fedpt.config import load_config
    from fedpt.cpu import cpu_summary
    from fedpt.evaluate import evaluate_rouge_sets
    from fedpt.models.llamacpp import LlamaCppLogitSource, LlamaCppModel, gguf_path
    from fedpt.models.loading import load_tokenizer
    from fedpt.server import load_eval_sets, load_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("large", "small"), default="large")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/retired_rows"))
    args = parser.parse_args()

    cfg = load_config()
    spec = cfg.model.large if args.model == "large" else cfg.model.small
    sets = load_eval_sets(cfg, load_splits(cfg))
    tokenizer = load_tokenizer(spec)
    model = LlamaCppModel(gguf_path(spec))
    retire = LlamaCppLogitSource.retire_rows
    best = {"on": float("inf"), "off": float("inf")}
    outputs = {}
    for _ in range(args.repeats):
        for setting in ("on", "off"):
            LlamaCppLogitSource.retire_rows = retire if setting == "on" else (lambda self, rows: None)
            start = time.perf_counter()
            results = evaluate_rouge_sets(model.source(), tokenizer, sets, cfg.eval, cfg.data)
            best[setting] = min(best[setting], time.perf_counter() - start)
            outputs[setting] = results
    LlamaCppLogitSource.retire_rows = retire
    same = sum(a == b for name in sets for a, b in zip(outputs["on"][name].predictions[0],
                                                       outputs["off"][name].predictions[0]))
    rouge = {s: {name: round(r.rouge_l, 2) for name, r in outputs[s].items()} for s in outputs}
    lines = [f"Retired rows on vs off: {spec} in llama.cpp, {sum(len(e) for e in sets.values())} prompts in batches of "
             f"{cfg.eval.batch_size}, {cfg.eval.max_new_tokens} new tokens, {cpu_summary()}, best of {args.repeats}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}", "",
             "| setting | seconds (prefill + decode) | Rouge-L per set |", "|---|---|---|"]
    for setting in ("on", "off"):
        lines.append(f"| retire {setting} | {best[setting]:.1f} | {rouge[setting]} |")
    lines += ["", f"speed-up {best['off'] / best['on']:.2f}x; identical outputs {same}/{sum(len(e) for e in sets.values())}"]
    print("\n".join(lines))
    from fedpt.bench import write_results

    write_results(args.out, {"cpu": cpu_summary(), "seconds": best, "rouge_l": rouge, "identical_outputs": same},
                  lines, show=False)


if __name__ == "__main__":
    main()
