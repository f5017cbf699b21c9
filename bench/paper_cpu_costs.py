"""Unit costs on the real Qwen pair that size the `paper-cpu` preset (a few minutes, not a run).

    OMP_NUM_THREADS=1 python bench/paper_cpu_costs.py [--threads-server 2] [--quick]

Measures, in one process, with the same code paths a run uses:
  * device LoRA step (small 0.5B and large 1.5B), batch 4, 1 thread (as a Ray device actor);
  * greedy evaluation per prompt (small, large, proxy = large + 2 small forwards), 48 new
    tokens, batch 8, server threads;
  * distillation: teacher (proxy) generation per KD prompt and per KD step, server threads.
Prints one JSON object. Run it on an idle machine for numbers that mean anything; the preset
header says when the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads-server", type=int, default=2)
    parser.add_argument("--device-steps", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--kd-prompts", type=int, default=8)
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
    train_cfg = cfg.train
    train_cfg.steps = args.device_steps
    torch.set_num_threads(1)
    for role in ("small", "large"):
        model = server.model(role)
        local_tune(model, server.tokenizer, splits.train[:64], cfg.data, cfg.train, seed=0)  # warm-up (1st step slow)
        t = time.perf_counter()
        result = local_tune(model, server.tokenizer, splits.train[:64], cfg.data, cfg.train, seed=1)
        out[f"device_step_seconds_{role}_1thread"] = (time.perf_counter() - t) / args.device_steps
        out[f"device_tokens_per_step_{role}"] = result.tokens / args.device_steps
        server.load_adapter(role, server.initial_adapter(role))
    torch.set_num_threads(args.threads_server)
    examples = splits.eval[: args.eval_prompts]
    for name, source in (("small", LocalLogitSource(server.small)), ("large", server.large_logits()),
                         ("proxy", server.proxy_tune())):
        t = time.perf_counter()
        evaluate_rouge(source, server.tokenizer, examples, cfg.eval, cfg.data)
        out[f"eval_seconds_per_prompt_{name}"] = (time.perf_counter() - t) / len(examples)
    prompts = [format_prompt(ex, cfg.data.template, server.tokenizer) for ex in splits.kd_pool[: args.kd_prompts]]
    for steps in (1, 3):
        cfg.distill.steps = steps
        t = time.perf_counter()
        result = distill(server.proxy_tune(), server.small, server.tokenizer, prompts, cfg.distill, cfg.data, seed=0)
        out[f"distill_seconds_{len(prompts)}prompts_{steps}steps"] = time.perf_counter() - t
    # Two runs differing only in steps: the difference is the cost of 2 KD steps of batch 4.
    out["kd_step_seconds"] = (out[f"distill_seconds_{len(prompts)}prompts_3steps"]
                              - out[f"distill_seconds_{len(prompts)}prompts_1steps"]) / 2
    out["kd_teacher_seconds_per_prompt"] = (out[f"distill_seconds_{len(prompts)}prompts_1steps"]
                                            - out["kd_step_seconds"]) / len(prompts)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
