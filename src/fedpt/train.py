"""Step 2 of a FedPT round: one device's local LoRA SFT of the small LM (no Flower here).

The loss is cross-entropy on response tokens only (prompt tokens are masked). A fresh AdamW
is made every round: optimizer moments are not sent to the server, so they cannot be averaged,
and keeping stale per-device moments across rounds of a changing global model is unsound.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from fedpt.config import DataConfig, TrainConfig
from fedpt.data.prompts import collate, encode_sft, format_prompt
from fedpt.data.records import Example
from fedpt.errors import FedPTError


@dataclass
class TrainResult:
    loss: float  # mean SFT loss over the round's steps
    last_loss: float
    steps: int
    num_examples: int
    tokens: int  # tokens processed (forward+backward), for FLOPs estimates
    seconds: float


def local_tune(
    model: Any, tokenizer: Any, examples: list[Example], data_cfg: DataConfig, cfg: TrainConfig, seed: int
) -> TrainResult:
    """Run ``cfg.steps`` LoRA steps on batches drawn (seeded) from ``examples``; updates ``model`` in place."""
    if not examples:
        raise FedPTError("this device's data partition is empty: nothing to train on")
    rows = [
        encode_sft(tokenizer, format_prompt(ex, data_cfg.template, tokenizer), ex.response,
                   data_cfg.max_prompt_tokens, data_cfg.max_seq_len)
        for ex in examples
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(seed)
    order: list[int] = []
    losses, tokens, start = [], 0, time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        # Walk through shuffled data epoch by epoch, so small partitions are used evenly.
        while len(order) < cfg.batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch_rows, order = [rows[i] for i in order[: cfg.batch_size]], order[cfg.batch_size:]
        batch = collate(batch_rows, tokenizer.pad_token_id)
        loss = model(**batch).loss  # HF shifts labels and skips IGNORE_INDEX
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    return TrainResult(
        loss=sum(losses) / len(losses), last_loss=losses[-1], steps=cfg.steps,
        num_examples=len(examples), tokens=tokens, seconds=time.perf_counter() - start,
    )
