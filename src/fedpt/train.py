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


def response_loss(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int = 256,
                  head_gradient_in_forward: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of ``batch`` (what HF's
    ``model(**batch).loss`` computes), without the full (B, T, V) logits.

    The decoder runs once; the LM head and the loss run on labelled positions only, in chunks of
    ``chunk_tokens``, so at most one chunk's fp32 logits exist at a time. A frozen head (LoRA
    leaves it alone) gets each chunk's gradient with respect to the hidden states while its
    logits exist (``_HeadLossAndGradient``): two products with the head per token where
    checkpointing the chunk took three (forward, its recomputation, backward), the same numbers.
    A trained head is checkpointed instead (so is every head with ``head_gradient_in_forward=False``,
    for side-by-side measurements). Models whose head does more than a projection (final
    logit soft-capping) fall back to the plain path.
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

    frozen_head = head_gradient_in_forward and not any(p.requires_grad for p in head.parameters())
    # d(mean)/d(chunk sum), as autograd will pass it: scaling before the head's product, as the
    # checkpointed path does, keeps the gradients bit for bit those of that path
    scale = torch.ones((), dtype=torch.float32) / max(len(targets), 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if frozen_head and hidden.requires_grad:
            total = total + _HeadLossAndGradient.apply(hidden[part], targets[part], chunk_loss, scale)
        else:
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, hidden[part], targets[part],
                                                              use_reentrant=False)
    return total / max(len(targets), 1)


class _HeadLossAndGradient(torch.autograd.Function):
    """``loss_fn(hidden, targets)`` whose backward returns the gradient with respect to ``hidden``
    computed in the forward pass, while the chunk's logits exist; only that (N, H) gradient is kept.
    ``expected``: the gradient the loss will receive (it scales the computation as autograd would;
    another one is still right, rescaled). For a frozen head only: no gradient reaches its weight."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, loss_fn: Any,
                expected: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            # through a view: module backward hooks (FlopCounterMode's) refuse a leaf input under autograd.grad
            loss = loss_fn(h.view_as(h), targets)
            (grad,) = torch.autograd.grad(loss, h, grad_outputs=expected)
        ctx.save_for_backward(grad, expected)
        return loss.detach()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        grad, expected = ctx.saved_tensors
        if torch.equal(grad_loss, expected):
            return grad, None, None, None
        return grad * (grad_loss / expected).to(grad.dtype), None, None, None


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
