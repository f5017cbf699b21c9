"""Peak memory of a device's LoRA step and of the server's KD student step, stage by stage.

    python bench/device_memory.py [--out bench/results/device_memory]

Each case runs in a fresh process with one thread (as a Ray device actor has), so its peak
(``ru_maxrss``, what a device reports as ``peak_rss_bytes``) is its own: the imports a ClientApp
has (torch, transformers, peft, Flower), the small LM of the qwen-cpu preset loaded as the case
loads it, then one step on the longest rows (the worst case of the preset's ``max_seq_len``):

- ``device``: ``fedpt.federation.device.device_model`` (bf16-stored frozen weights upcast on
  use) and one ``local_tune`` step of 4 rows, with the LM head upcast whole or a block of rows
  at a time (``fedpt.models.loading.UPCAST_BLOCK_ELEMENTS``);
- ``student``: the server's KD student, ``load_model`` (fp32 on AVX2 CPUs) against
  ``load_model_for_training``, one step of ``kd_loss`` on 4 packed KD rows (prompt + 32 teacher
  tokens, random teacher log-probabilities);
- each with the allocators as they come (``FEDPT_MALLOC_MMAP_THRESHOLD=off``,
  ``THP_MEM_ALLOC_ENABLE=0``) and as fedpt sets them (``fedpt.malloc``: glibc's mmap threshold
  fixed at 1 MiB, torch's huge-page allocations on), and the device also with the threshold alone.

Cases alternate over ``--repeats`` rounds (the step's seconds: best of them, so a busy machine
slows both alike; memory: the last). Prints RSS after each stage and the peak, names the CPU;
writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEFAULTS = {"FEDPT_MALLOC_MMAP_THRESHOLD": "off", "THP_MEM_ALLOC_ENABLE": "0"}  # the allocators as they come
THRESHOLD_ONLY = {"THP_MEM_ALLOC_ENABLE": "0"}
CASES = {  # name: (kind, UPCAST_BLOCK_ELEMENTS or None for fedpt's, environment over fedpt's settings)
    "device, allocator defaults, head upcast whole": ("device", 2**40, DEFAULTS),
    "device, allocator defaults, head in blocks": ("device", None, DEFAULTS),
    "device, 1 MiB mmap threshold only, head in blocks": ("device", None, THRESHOLD_ONLY),
    "device, fedpt.malloc, head in blocks": ("device", None, {}),
    "student fp32 (load_model), allocator defaults": ("student-fp32", None, DEFAULTS),
    "student fp32 (load_model), fedpt.malloc": ("student-fp32", None, {}),
    "student bf16 stored + upcast, fedpt.malloc": ("student-lean", None, {}),
}


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(kind: str, block: int | None) -> dict:
    """One case in this process; its allocator settings came with the environment the parent gave it."""
    import fedpt  # noqa: F401  (before torch: sets MKL_CBWR)
    import flwr  # noqa: F401  (a ClientApp's imports)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import fedpt.models.loading as loading
    from fedpt.config import load_config
    from fedpt.data.prompts import format_prompt
    from fedpt.data.records import load_examples

    torch.set_num_threads(1)
    if block is not None:
        loading.UPCAST_BLOCK_ELEMENTS = block
    stages = {"imports": rss()}
    cfg = load_config(overrides=["train.steps=1"])
    tokenizer = loading.load_tokenizer(cfg.model.small)
    examples = sorted(load_examples(cfg.data.source), key=lambda e: -len(e.response))  # longest first
    if kind == "device":
        from fedpt.federation.device import device_model
        from fedpt.train import local_tune

        model, _ = device_model(cfg.model.small, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                tuple(cfg.lora.targets))
        stages["model loaded"], load_peak = rss(), peak()
        result = local_tune(model, tokenizer, examples[:4], cfg.data, cfg.train, seed=0)
        seconds = result.seconds
        work = f"1 LoRA step, {result.tokens} tokens, loss {result.loss:.4f}"
    else:
        from fedpt.distill import build_kd_batches, kd_loss, packed
        from fedpt.distill import _student_logits as student_logits
        from fedpt.models.lora import attach_lora

        load = loading.load_model if kind == "student-fp32" else loading.load_model_for_training
        student = attach_lora(load(cfg.model.small, cfg.model.dtype), cfg.lora, seed=0)
        stages["model loaded"], load_peak = rss(), peak()
        generator = torch.Generator().manual_seed(0)
        prompts = [format_prompt(ex, cfg.data.template, tokenizer) for ex in examples[:4]]
        responses = [torch.randint(0, 150000, (cfg.distill.max_new_tokens,), generator=generator).tolist()
                     for _ in prompts]
        vocab = student.get_output_embeddings().weight.shape[0]
        teacher = [torch.log_softmax(torch.randn(len(r), vocab, generator=generator), -1).to(torch.bfloat16)
                   for r in responses]
        cfg.distill.batch_size = 4
        batch = packed(build_kd_batches(None, tokenizer, prompts, responses, cfg.distill, cfg.data, teacher)[0])
        stages["teacher log-probabilities kept"] = rss()
        student.train()
        started = time.perf_counter()
        loss = kd_loss(student_logits(student, batch), batch, cfg.distill.temperature, cfg.distill.ce_weight)
        loss.backward()
        seconds = time.perf_counter() - started
        work = f"1 KD step, {int(batch.attention_mask.sum())} tokens, loss {loss.item():.4f}"
    dtype = {str(p.dtype) for p in (model if kind == "device" else student).parameters() if not p.requires_grad}
    return {"stages_rss_bytes": stages, "load_peak_bytes": load_peak, "peak_bytes": peak(), "work": work,
            "frozen_dtypes": sorted(dtype), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/device_memory"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's case
    args = parser.parse_args()
    if args.case:
        kind, block, _ = CASES[args.case]
        print(json.dumps(run_case(kind, block)))
        return

    from fedpt.bench import run_case_process
    from fedpt.cpu import cpu_summary

    results: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, (_, _, settings) in CASES.items():
            env = {k: v for k, v in os.environ.items() if k not in DEFAULTS} | {"OMP_NUM_THREADS": "1"} | settings
            r = run_case_process(__file__, name, env, results)
            print(f"[{repeat + 1}/{args.repeats}] {name}: "
                  + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in r["stages_rss_bytes"].items())
                  + f"; peak {r['peak_bytes'] / 2**30:.2f} GiB; step {r['seconds']:.1f} s ({r['work']})", flush=True)
    cpu = cpu_summary()
    lines = [f"`python bench/device_memory.py --repeats {args.repeats}` on {cpu}: one step on the longest rows, one "
             "thread, each case in a fresh process, cases alternating (RSS in GiB; peak = `ru_maxrss`; step seconds: "
             "best of the repeats).", "",
             "| case | frozen weights | after imports | model loaded | peak while loading | peak | step s | work |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["stages_rss_bytes"]
        lines.append(f"| {name} | {', '.join(r['frozen_dtypes'])} | {s['imports'] / 2**30:.2f} | "
                     f"{s['model loaded'] / 2**30:.2f} | {r['load_peak_bytes'] / 2**30:.2f} | "
                     f"**{r['peak_bytes'] / 2**30:.2f}** | {r['seconds']:.1f} | {r['work']} |")
    from fedpt.bench import write_results

    write_results(args.out, {"cpu": cpu, "cases": results}, lines)


if __name__ == "__main__":
    main()
