"""Device steps on two cores: two one-thread processes side by side vs one two-thread process in turn.

    python bench/device_threads.py [--batches 4] [--repeats 2] [--out bench/results/device_threads]

The simulation trains ``cpu_count / federation.client_cpus`` devices at once, one thread each
(``client_cpus = 1`` on 2 cores: two Ray actors). The other way to use two cores is one device at
a time with two threads (``client_cpus = 2``): no process ever waits for another's longer device,
but a step must then run twice as fast on two threads as on one. This measures both on the same
work: ``--batches`` packed device steps of the qwen-cpu preset (4 Dolly rows each, the device's
model, activation checkpointing), split between two fresh one-thread processes started together
(the slower one's seconds count, as a round waits for it), against one fresh two-thread process
doing all of them. The two cases alternate over ``--repeats`` rounds. Prints the seconds per step,
the ratio, the CPU; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def device_stepper() -> tuple[Any, Callable[[int], list], Callable[[list], float]]:
    """This process's device model (warmed up), ``rows(b)`` (packed batch ``b``: 4 Dolly rows) and
    ``step(rows)`` (forward + backward, returns the loss)."""
    import fedpt  # noqa: F401  (before torch: MKL and allocator settings)

    from fedpt.config import load_config
    from fedpt.data.prompts import encode_sft, format_prompt, pack
    from fedpt.data.records import load_examples
    from fedpt.federation.device import device_model
    from fedpt.train import response_loss

    cfg = load_config()
    model, tokenizer = device_model(cfg.model.small, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha,
                                    cfg.lora.dropout, tuple(cfg.lora.targets))
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    examples = load_examples(cfg.data.source)
    random.Random(0).shuffle(examples)

    def encode(ex):  # noqa: ANN001, ANN202
        return encode_sft(tokenizer, format_prompt(ex, cfg.data.template, tokenizer), ex.response,
                          cfg.data.max_prompt_tokens, cfg.data.max_seq_len)

    def step(rows: list) -> float:
        loss = response_loss(model, pack(rows))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step([encode(ex) for ex in examples[-2:]])  # warm-up: first-call costs out of the timings
    return model, (lambda b: [encode(ex) for ex in examples[4 * b: 4 * b + 4]]), step


def run_steps(batches: list[int]) -> dict:
    """This process: the device model, a warm-up step, then one timed step per batch index."""
    import torch

    _, rows_of, step = device_stepper()
    steps = []
    for b in batches:
        rows = rows_of(b)
        started = time.perf_counter()
        step(rows)
        steps.append({"batch": b, "tokens": sum(len(ids) for ids, _ in rows),
                      "seconds": time.perf_counter() - started})
    return {"threads": torch.get_num_threads(), "steps": steps}


def spawn(threads: int, batches: list[int]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, __file__, "--child", ",".join(map(str, batches))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a step process failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/device_threads"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a step process's batch indices
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_steps([int(b) for b in args.child.split(",")])))
        return

    from fedpt.cpu import cpu_summary

    batches = list(range(args.batches))
    rounds = []
    for repeat in range(args.repeats):
        pair = [collect(p) for p in [spawn(1, batches[0::2]), spawn(1, batches[1::2])]]
        busy = [sum(s["seconds"] for s in r["steps"]) for r in pair]
        alone = collect(spawn(2, batches))
        together = sum(s["seconds"] for s in alone["steps"])
        rounds.append({"two_processes_seconds": busy, "one_process_seconds": together,
                       "two_processes_steps": [r["steps"] for r in pair], "one_process_steps": alone["steps"],
                       "one_process_threads": alone["threads"]})
        print(f"[{repeat + 1}/{args.repeats}] two 1-thread processes: {busy[0]:.1f} / {busy[1]:.1f} s; "
              f"one {alone['threads']}-thread process: {together:.1f} s", flush=True)
    best_pair = min(max(r["two_processes_seconds"]) for r in rounds)
    best_one = min(r["one_process_seconds"] for r in rounds)
    tokens = sum(s["tokens"] for s in rounds[0]["one_process_steps"])
    one_thread = sum(s["seconds"] for r in rounds for p in r["two_processes_steps"] for s in p) / len(rounds)
    cpu = cpu_summary()
    lines = [f"`python bench/device_threads.py --batches {args.batches} --repeats {args.repeats}` on {cpu}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}: {args.batches} packed device steps ({tokens} tokens), best of "
             f"{args.repeats} alternating rounds.", "",
             "| way | seconds | ÷ two one-thread processes |", "|---|---|---|",
             f"| two one-thread processes side by side (the slower one) | {best_pair:.1f} | 1.00 |",
             f"| one two-thread process, the steps in turn | {best_one:.1f} | **{best_one / best_pair:.2f}** |", "",
             f"Two threads run a step {one_thread / best_one:.2f}× as fast as one (mean one-thread seconds of all "
             f"steps, {one_thread:.1f} s, over the best two-thread run)."]
    from fedpt.bench import write_results

    write_results(args.out, {"cpu": cpu, "rounds": rounds}, lines)


if __name__ == "__main__":
    main()
