"""Step 2 of a FedPT round: one device's local LoRA SFT of the small LM (no Flower here).

The loss is cross-entropy on response tokens only (prompt tokens are masked), computed by
``response_loss``: the LM head runs only on positions that have a label, a chunk at a time,
so the (B, T, V) logits a 150k-token vocabulary makes are never materialised. A fresh AdamW
is made every round: optimizer moments are not sent to the server, so they cannot be averaged,
and keeping stale per-device moments across rounds of a changing global model is unsound.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

from fedpt.config import DataConfig, TrainConfig
from fedpt.data.prompts import IGNORE_INDEX, collate, encode_sft, format_prompt, pack
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


def response_loss(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of ``batch`` (what HF's
    ``model(**batch).loss`` computes), without the full (B, T, V) logits.

    The decoder runs once; the LM head and the loss run on labelled positions only, in chunks of
    ``chunk_tokens`` under activation checkpointing, so at most one chunk's fp32 logits exist at a
    time (the backward pass recomputes them). Models whose head does more than a projection
    (final logit soft-capping) fall back to the plain path.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm.config, "final_logit_softcapping", None):
        return model(**batch).loss
    targets = batch["labels"][:, 1:]  # logits at t predict token t+1
    select = targets != IGNORE_INDEX  # (B, T-1)
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                     position_ids=batch.get("position_ids"),  # packed rows (``pack``)
                                     use_cache=False).last_hidden_state  # (B, T, H)
    hidden, targets = hidden[:, :-1][select], targets[select]  # (N, H), (N,)
    head = causal_lm.get_output_embeddings()

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + torch.utils.checkpoint.checkpoint(chunk_loss, hidden[part], targets[part], use_reentrant=False)
    return total / max(len(targets), 1)


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
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.gradient_checkpointing:
        # non-reentrant: no need for inputs that require grad (the frozen embeddings' output)
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif causal_lm.is_activation_checkpointing:
        causal_lm.activation_checkpointing_disable()
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
        batch = pack(batch_rows) if cfg.pack_rows else collate(batch_rows, tokenizer.pad_token_id)
        loss = response_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += sum(len(ids) for ids, _ in batch_rows)
    model.eval()
    return TrainResult(
        loss=sum(losses) / len(losses), last_loss=losses[-1], steps=cfg.steps,
        num_examples=len(examples), tokens=tokens, seconds=time.perf_counter() - start,
    )
