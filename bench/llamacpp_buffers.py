"""What llama.cpp's extra (repacked / AMX) weight buffers cost or gain on this CPU, and how far
each decoding batch size is from its hardware bound.

    python bench/llamacpp_buffers.py [--model qwen2.5-coder-1.5b-instruct] [--repeats 3] [--batches 1,8,16,32]
                                     [--out bench/results/llamacpp_buffers]

FedPT turns llama.cpp's extra buffer types off on CPUs with AMX (the AMX buffer segfaults there
with K-quants; ``fedpt.models.llamacpp.extra_buffers_enabled``) and keeps them elsewhere. This
measures, on the model's own GGUF and on the CPU at hand, both settings side by side in one
process, interleaved (best of ``--repeats``): prefill of 128 tokens (one row) and greedy decoding
of 32 tokens at each ``--batches`` size, and checks that both give the same greedy tokens.
Each case's bound, measured in the same run: a decoding step reads the GGUF once (memory
bandwidth: a sum over 1 GiB) and does 2 x params FLOPs per row (torch's bf16/fp32 GEMM rate);
the bound is the slower of the two, and "of bound" is the measured rate over it.
Prints a Markdown table (with the CPU) and writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR)
import torch


def measure(model, batch: int, prompt: int, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill tok/s, decode tok/s, greedy tokens) for ``batch`` rows of ``prompt`` tokens."""
    source = model.source()
    ids = (torch.arange(batch * prompt).view(batch, prompt) * 7919 + 13) % 150000  # deterministic, distinct rows
    start = time.perf_counter()
    logits = source.prefill(ids, torch.ones_like(ids))
    prefill = time.perf_counter() - start
    tokens = [logits.argmax(-1)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = source.step(tokens[-1])
        tokens.append(logits.argmax(-1))
    decode = time.perf_counter() - start
    source.close()
    return batch * prompt / prefill, batch * (new_tokens - 1) / decode, torch.stack(tokens, 1).tolist()


def main() -> None:
    from fedpt.cpu import cpu_summary
    from fedpt.models.llamacpp import LlamaCppModel, gguf_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batches", default="1,8", help="decoding batch sizes, comma-separated")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llamacpp_buffers"))
    args = parser.parse_args()

    gguf = gguf_path(args.model)
    models = {}
    for setting in ("on", "off"):
        os.environ["FEDPT_LLAMACPP_EXTRA_BUFFERS"] = setting  # the product's switch
        models[setting] = LlamaCppModel(gguf, threads=args.threads)
    cases = [("prefill 128, batch 1", 1, 128, 2)] + [(f"decode, batch {b}", b, 16, 33)
                                                   for b in (int(x) for x in args.batches.split(","))]
    best: dict[tuple[str, str], float] = {}
    same = True
    for _ in range(args.repeats):
        for name, batch, prompt, new in cases:
            outputs = {}
            for setting, model in models.items():  # interleaved: the machine's load hits both alike
                prefill, decode, outputs[setting] = measure(model, batch, prompt, new)
                value = prefill if name.startswith("prefill") else decode
                best[(name, setting)] = max(best.get((name, setting), 0.0), value)
            same &= outputs["on"] == outputs["off"]
    from fedpt.bench import gemm_bound
    from fedpt.bench_phases import memory_bandwidth
    from fedpt.models.loading import fast_bf16_matmul, gguf_bytes, weights_bytes

    bandwidth = memory_bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    gemm = gemm_bound(torch.bfloat16 if fast_bf16_matmul() else torch.float32, 1024, 1536, 8960, 3)
    params = (weights_bytes(args.model, "float32") or 0) / 4
    step_bytes = gguf_bytes(args.model) or gguf.stat().st_size

    def bound(batch: int, prefill: bool) -> float:  # tokens/s
        compute = gemm / (2 * params)
        return compute if prefill else min(compute, bandwidth / step_bytes * batch)

    rows = [{"case": name, "tok_s_on": best[(name, "on")], "tok_s_off": best[(name, "off")],
             "off_over_on": best[(name, "off")] / best[(name, "on")], "bound_tok_s": bound(batch, name.startswith("prefill")),
             "on_of_bound": best[(name, "on")] / bound(batch, name.startswith("prefill")),
             "off_of_bound": best[(name, "off")] / bound(batch, name.startswith("prefill"))}
            for name, batch, *_ in cases]
    result = {"cpu": cpu_summary(), "model": args.model, "gguf": str(gguf), "threads": args.threads,
              "repeats": args.repeats, "same_greedy_tokens": same, "rows": rows,
              "bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": gemm / 1e9, "params": params, "gguf_bytes": step_bytes,
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg()}
    lines = [f"llama.cpp extra buffers on vs off: {args.model}, {cpu_summary()}, {args.threads} thread(s), "
             f"best of {args.repeats}, load average {result['load_average'][0]:.1f} at the start of the write",
             f"; bounds from {bandwidth / 1e9:.1f} GB/s read bandwidth, {step_bytes / 2**30:.2f} GiB per step, "
             f"{gemm / 1e9:.0f} GFLOP/s GEMM, {params / 1e9:.2f} B params",
             "", "| case | tok/s on | tok/s off | off / on | bound tok/s | on: of bound | off: of bound |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['tok_s_on']:.1f} | {r['tok_s_off']:.1f} | {r['off_over_on']:.2f} | "
              f"{r['bound_tok_s']:.1f} | {r['on_of_bound']:.2f} | {r['off_of_bound']:.2f} |" for r in rows]
    lines.append(f"\nsame greedy tokens with both settings: {same}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
