"""A device's LoRA step with its last decoder layers keeping their activations, side by side.

    OMP_NUM_THREADS=1 python bench/activation_memory.py [--budgets 0,448] [--repeats 2] [--out PATH]

``train.activation_memory_mb`` lets the last decoder layers skip activation checkpointing's
recomputation as long as their activations fit in that many MiB for the step's tokens. Each case
is one ``local_tune`` step of the qwen-cpu preset's device (``fedpt.federation.device.device_model``:
bf16-stored weights upcast on use, one thread, as a Ray device actor) in a fresh process, so its
peak (``ru_maxrss``, what a device reports as ``peak_rss_bytes``) is its own, on two batches of
4 packed rows: the longest rows (the preset's worst case) and the first rows of a device's
seeded order (a typical step). Budgets alternate within each repeat; seconds: best of the
repeats; the ratio is against budget 0 on the same rows. Names the CPU; writes OUT.json, OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROWS = ("longest", "typical")


def run_case(rows: str, budget: int) -> dict:
    import resource

    import fedpt  # noqa: F401  (before torch: sets MKL_CBWR)
    import torch

    from fedpt.config import load_config
    from fedpt.data.records import load_examples
    from fedpt.federation.device import device_model
    from fedpt.models.loading import load_tokenizer
    from fedpt.train import local_tune

    torch.set_num_threads(1)
    cfg = load_config(overrides=["train.steps=1", f"train.activation_memory_mb={budget}"])
    examples = load_examples(cfg.data.source)
    if rows == "longest":
        examples = sorted(examples, key=lambda e: -len(e.response))
    model, _ = device_model(cfg.model.small, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                            tuple(cfg.lora.targets))
    result = local_tune(model, load_tokenizer(cfg.model.small), examples[:64], cfg.data, cfg.train, seed=0)
    return {"seconds": result.seconds, "tokens": result.tokens, "loss": result.loss, "layers_kept": result.layers_kept,
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "adapter_sum": float(sum(p.double().sum() for n, p in model.named_parameters() if p.requires_grad))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0,448", help="comma-separated MiB (0 = every layer recomputes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/activation_memory"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's "rows,budget"
    args = parser.parse_args()
    if args.case:
        rows, budget = args.case.split(",")
        print(json.dumps(run_case(rows, int(budget))))
        return

    from fedpt.bench import run_case_process, write_results
    from fedpt.cpu import cpu_summary

    budgets = [int(b) for b in args.budgets.split(",")]
    results: dict[str, dict] = {}
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    for repeat in range(args.repeats):
        for rows in ROWS:
            for budget in budgets:
                r = run_case_process(__file__, f"{rows},{budget}", env, results)
                print(f"[{repeat + 1}/{args.repeats}] {rows} rows, {budget} MiB: {r['tokens']} tokens, "
                      f"{r['layers_kept']:.0f} layers kept, step {r['seconds']:.1f} s, peak "
                      f"{r['peak_bytes'] / 2**30:.2f} GiB, loss {r['loss']:.6f}", flush=True)
    cpu = cpu_summary()
    lines = [f"`OMP_NUM_THREADS=1 python bench/activation_memory.py --budgets {args.budgets} --repeats "
             f"{args.repeats}` on {cpu}: one device step (qwen-cpu preset, 4 packed rows, one thread), each case in "
             "a fresh process, budgets alternating; seconds: best of the repeats; ratio against budget 0 on the same "
             "rows.", "",
             "| rows | tokens | activation_memory_mb | layers kept | step s | ÷ budget 0 | peak GiB | loss | "
             "adapter identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rows in ROWS:
        base = results[f"{rows},{budgets[0]}"]
        for budget in budgets:
            r = results[f"{rows},{budget}"]
            same = r["loss"] == base["loss"] and r["adapter_sum"] == base["adapter_sum"]
            lines.append(f"| {rows} | {r['tokens']} | {budget} | {r['layers_kept']:.0f} | {r['seconds']:.1f} | "
                         f"**{r['seconds'] / base['seconds']:.3f}** | {r['peak_bytes'] / 2**30:.2f} | "
                         f"{r['loss']:.6f} | {'yes' if same else 'NO'} |")
    write_results(args.out, {"cpu": cpu, "budgets": budgets, "cases": results}, lines)


if __name__ == "__main__":
    main()
