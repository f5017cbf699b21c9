"""Packed vs padded rows in a device's LoRA step and a KD student step, side by side in one process.

    OMP_NUM_THREADS=1 python bench/packed_rows.py [--batches 6] [--repeats 2] [--no-padded] [--out bench/results/packed_rows]

A device step (``train.pack_rows``) and a distillation student step (``distill.pack_rows``) of
the qwen-cpu preset's small LM, one thread as a Ray device actor has, on the same random
batches of the preset's device data (Dolly, 4 rows, up to 320 tokens) and KD-shaped rows
(prompt + 32 response tokens): forward + backward of the response loss, padded to the longest
row vs the rows end to end; packed rows attending row by row (``fedpt.models.attention``, what
fedpt does) vs one SDPA call over the whole packed block under its block-diagonal mask
(transformers' ``sdpa``, what fedpt did before). The variants alternate batch by batch, best of
``--repeats``, so a busy machine slows them alike. Prints real and padded tokens, seconds, and
the speed-ups with the CPU named; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch: sets MKL_CBWR)
import torch


def main() -> None:
    from fedpt.bench import best_seconds
    from fedpt.config import load_config
    from fedpt.cpu import cpu_summary
    from fedpt.data.prompts import IGNORE_INDEX, collate, encode_sft, format_prompt, pack
    from fedpt.data.records import load_examples
    from fedpt.models.attention import ATTENTION_NAME
    from fedpt.models.loading import load_model_for_training, load_tokenizer, resolve_dtype
    from fedpt.models.lora import attach_lora
    from fedpt.train import response_loss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-padded", action="store_true", help="packed variants only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/packed_rows"))
    args = parser.parse_args()

    cfg = load_config()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(cfg.model.small)
    model = attach_lora(load_model_for_training(cfg.model.small, cfg.model.dtype), cfg.lora, seed=0)
    causal_lm = model.get_base_model()
    causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    examples = load_examples(cfg.data.source)
    rng = random.Random(0)
    device_rows = [encode_sft(tokenizer, format_prompt(ex, cfg.data.template, tokenizer), ex.response,
                              cfg.data.max_prompt_tokens, cfg.data.max_seq_len) for ex in rng.sample(examples, 400)]
    # KD rows: an instruction's prompt and a 32-token response, as the teacher writes them
    kd_rows = []
    for ex in rng.sample(examples, 400):
        prompt = tokenizer(format_prompt(ex, cfg.data.template, tokenizer), add_special_tokens=False)["input_ids"]
        response = tokenizer(ex.response, add_special_tokens=False)["input_ids"][:cfg.distill.max_new_tokens]
        prompt = prompt[-cfg.data.max_prompt_tokens:]
        kd_rows.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))

    def step(batch: dict, attention: str) -> None:
        causal_lm.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        response_loss(model, batch).backward()

    results = {}
    for name, rows, batch_size in (("device step", device_rows, cfg.train.batch_size),
                                   ("kd student step", kd_rows, cfg.distill.batch_size)):
        seconds = {"padded": 0.0, "packed, masked block": 0.0, "packed, row by row": 0.0}
        if args.no_padded:
            del seconds["padded"]
        real = padded = 0
        for b in range(args.batches):
            chosen = rows[b * batch_size: (b + 1) * batch_size]
            padded_batch, packed_batch = collate(chosen, tokenizer.pad_token_id), pack(chosen)
            real += packed_batch["input_ids"].numel()
            padded += padded_batch["input_ids"].numel()
            for variant, batch, attention in (("padded", padded_batch, ATTENTION_NAME),  # padded: sdpa's path
                                              ("packed, masked block", packed_batch, "sdpa"),
                                              ("packed, row by row", packed_batch, ATTENTION_NAME)):
                if variant in seconds:
                    seconds[variant] += best_seconds(lambda: step(batch, attention), args.repeats)
        results[name] = {"batches": args.batches, "rows": batch_size, "real_tokens": real, "padded_tokens": padded,
                         "seconds": seconds}
        print(f"{name}: {real} real of {padded} padded tokens; "
              + ", ".join(f"{v} {s:.1f} s" for v, s in seconds.items()), flush=True)
    causal_lm.set_attn_implementation(ATTENTION_NAME)

    head = (f"Packed vs padded rows, {cfg.model.small} ({resolve_dtype(cfg.model.dtype)} compute), 1 thread, "
            f"{cpu_summary()}, best of {args.repeats}, {time.strftime('%Y-%m-%d %H:%M')}")
    variants = list(next(iter(results.values()))["seconds"])
    lines = [head, "", "| step | batches x rows | real tokens | padded tokens | "
             + " | ".join(f"{v} s" for v in variants) + " | row by row ÷ masked block | packed ÷ padded |",
             "|---|---|---|---|" + "---|" * (len(variants) + 2)]
    for name, r in results.items():
        s = r["seconds"]
        rows_over_mask = s["packed, row by row"] / s["packed, masked block"]
        over_padded = f"{s['packed, row by row'] / s['padded']:.2f}" if "padded" in s else ""
        lines.append(f"| {name} | {r['batches']} x {r['rows']} | {r['real_tokens']} | {r['padded_tokens']} | "
                     + " | ".join(f"{s[v]:.1f}" for v in variants) + f" | {rows_over_mask:.3f} | {over_padded} |")
    print("\n".join(lines))
    from fedpt.bench import write_results

    write_results(args.out, {"cpu": cpu_summary(), "results": results}, lines, show=False)


if __name__ == "__main__":
    main()
