"""Unit costs on the real Qwen pair that size the `paper-cpu` preset (a few minutes, not a run).

    OMP_NUM_THREADS=1 python bench/paper_cpu_costs.py [--threads-server 2] [--quick]

Measures, in one process, with the same code paths a run uses:
  * device LoRA step (small 0.5B and large 1.5B), batch 4, 1 thread (as a Ray device actor);
  * greedy evaluation per prompt (small, large, proxy = large + 2 small forwards), 48 new
    tokens, batch 8, server threads;
  * distillation: teacher (proxy) generation per KD prompt and per KD step, server threads.
Prints one JSON object with wall seconds and process CPU seconds for each. On a busy machine
(other jobs on the same 2 cores) wall time is inflated by waiting for a core; CPU time is
not (only by cache and memory-bandwidth contention), so the preset is sized from CPU time:
a 1-thread step's idle wall time ~ its CPU time, a 2-thread step's ~ CPU time / 2 at best.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import torch


@contextmanager
def timed(out: dict, key: str, divide: float = 1.0):
    """Record wall and process-CPU seconds of the block (divided by ``divide``)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    out[key] = {"wall": (time.perf_counter() - wall) / divide, "cpu": (time.process_time() - cpu) / divide}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads-server", type=int, default=2)
    parser.add_argument("--device-steps", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--kd-prompts", type=int, default=8)
    parser.add_argument("--only-small-step", action="store_true",
                        help="just the small device step (what a loaded machine allows in a few minutes)")
    args = parser.parse_args()

    from fedpt.config import load_config
    from fedpt.data.prompts import format_prompt
    from fedpt.distill import distill
    from fedpt.evaluate import evaluate_rouge
    from fedpt.models.logits import LocalLogitSource
    from fedpt.server import ServerModels, load_splits
    from fedpt.train import local_tune

    cfg = load_config(preset="qwen-cpu", overrides=["data.eval_size=8", "data.kd_pool_size=16",
                                                    "eval.max_new_tokens=48", "eval.batch_size=8",
                                                    "distill.max_new_tokens=32", "distill.batch_size=4"])
    out: dict = {"threads_server": args.threads_server}
    start = time.perf_counter()
    splits = load_splits(cfg)
    server = ServerModels.load(cfg, splits, large_trainable=True)
    out["load_seconds"] = time.perf_counter() - start
    import dataclasses

    torch.set_num_threads(1)
    for role in ("small",) if args.only_small_step else ("small", "large"):
        model = server.model(role)
        warm = dataclasses.replace(cfg.train, steps=1)
        local_tune(model, server.tokenizer, splits.train[:64], cfg.data, warm, seed=0)  # warm-up (1st step slow)
        steps = args.device_steps if role == "small" else 1
        with timed(out, f"device_step_{role}_1thread", steps):
            result = local_tune(model, server.tokenizer, splits.train[:64], cfg.data,
                                dataclasses.replace(cfg.train, steps=steps), seed=1)
        out[f"device_tokens_per_step_{role}"] = result.tokens / steps
        server.load_adapter(role, server.initial_adapter(role))
        print(json.dumps(out), flush=True)
    if args.only_small_step:
        return
    torch.set_num_threads(args.threads_server)
    examples = splits.eval[: args.eval_prompts]
    for name, source in (("small", LocalLogitSource(server.small)), ("large", server.large_logits()),
                         ("proxy", server.proxy_tune())):
        with timed(out, f"eval_per_prompt_{name}", len(examples)):
            evaluate_rouge(source, server.tokenizer, examples, cfg.eval, cfg.data)
        print(json.dumps(out), flush=True)
    prompts = [format_prompt(ex, cfg.data.template, server.tokenizer) for ex in splits.kd_pool[: args.kd_prompts]]
    for steps in (1, 3):
        cfg.distill.steps = steps
        with timed(out, f"distill_{len(prompts)}prompts_{steps}steps"):
            distill(server.proxy_tune(), server.small, server.tokenizer, prompts, cfg.distill, cfg.data, seed=0)
        print(json.dumps(out), flush=True)
    # Two runs differing only in steps: the difference is the cost of 2 KD steps of batch 4.
    one, three = out[f"distill_{len(prompts)}prompts_1steps"], out[f"distill_{len(prompts)}prompts_3steps"]
    out["kd_step"] = {k: (three[k] - one[k]) / 2 for k in one}
    out["kd_teacher_per_prompt"] = {k: (one[k] - out["kd_step"][k]) / len(prompts) for k in one}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
