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
    layers_kept: float = 0.0  # decoder layers per step that kept activations (train.activation_memory_mb)


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

    def chunk_logits(h: torch.Tensor) -> torch.Tensor:
        return head(h).float()

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(chunk_logits(h), t, reduction="sum")

    frozen_head = head_gradient_in_forward and not any(p.requires_grad for p in head.parameters())
    # d(mean)/d(chunk sum), as autograd will pass it: scaling before the head's product, as the
    # checkpointed path does, keeps the gradients bit for bit those of that path
    scale = torch.ones((), dtype=torch.float32) / max(len(targets), 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if frozen_head and hidden.requires_grad:
            total = total + _HeadLossAndGradient.apply(hidden[part], targets[part], chunk_logits, scale)
        else:
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, hidden[part], targets[part],
                                                              use_reentrant=False)
    return total / max(len(targets), 1)


# Rows of a chunk whose log-probabilities and their gradients exist at once in ``_HeadLossAndGradient``
# (Qwen2.5's 151,936-token vocabulary: 39 MB per fp32 tensor).
HEAD_ROWS = 64


class _HeadLossAndGradient(torch.autograd.Function):
    """A chunk's summed cross-entropy, ``cross_entropy(logits_fn(hidden), targets, reduction="sum")``,
    whose backward returns the gradient with respect to ``hidden`` computed in the forward pass,
    while the logits exist; only that (N, H) gradient is kept. ``expected``: the gradient the loss
    will receive (it scales the computation as autograd would; another one is still right,
    rescaled). For a frozen head only: no gradient reaches its weight.

    The head's two products (logits, and the gradient's way back) run at the chunk's width: on MKL
    their results depend on the number of rows, so pieces of them would change the numbers. What
    runs ``HEAD_ROWS`` rows at a time is what each row does alone: its log-softmax and that
    function's gradient, which then takes the place of the row's logits in their buffer. The chunk's
    sum is ``nll_loss`` over the picked log-probabilities in order, as ``cross_entropy`` adds it up.
    Loss and gradients are those of the whole chunk at once, bit for bit, with one chunk-wide fp32
    tensor instead of three or four."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, logits_fn: Any,
                expected: torch.Tensor) -> torch.Tensor:
        picked = []
        with torch.enable_grad():
            h = hidden.detach().requires_grad_()
            # through a view: module backward hooks (FlopCounterMode's) refuse a leaf input under autograd.grad
            logits = logits_fn(h.view_as(h))
            buffer = logits.detach()  # the logits' storage: each piece's gradient replaces its rows
            for start in range(0, len(targets), HEAD_ROWS):
                rows = slice(start, start + HEAD_ROWS)
                piece = buffer[rows].clone().requires_grad_()
                log_probs = torch.log_softmax(piece, dim=-1)
                loss = torch.nn.functional.nll_loss(log_probs, targets[rows], reduction="sum")
                (grad_piece,) = torch.autograd.grad(loss, piece, grad_outputs=expected)
                picked.append(log_probs.detach().gather(1, targets[rows, None]))
                with torch.no_grad():
                    buffer[rows] = grad_piece
            (grad,) = torch.autograd.grad(logits, h, grad_outputs=buffer)
        # cross_entropy's own sum: nll_loss over the chunk's picked log-probabilities, in order
        loss = torch.nn.functional.nll_loss(torch.cat(picked), torch.zeros_like(targets), reduction="sum")
        ctx.save_for_backward(grad, expected)
        return loss

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
    layers = checkpointed_layers(causal_lm) if cfg.gradient_checkpointing else []
    budget = cfg.activation_memory_mb * 2**20
    measure = bool(layers and budget)
    kept = []
    for _ in range(cfg.steps):
        # Walk through shuffled data epoch by epoch, so small partitions are used evenly.
        while len(order) < cfg.batch_size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch_rows, order = [rows[i] for i in order[: cfg.batch_size]], order[cfg.batch_size:]
        batch = pack(batch_rows) if cfg.pack_rows else collate(batch_rows, tokenizer.pad_token_id)
        if measure:
            per_token = layer_bytes_per_token(causal_lm, cfg.pack_rows, row_length(batch))
            kept.append(keep_activations(layers, budget, per_token, batch["input_ids"].numel()))
        loss = response_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += sum(len(ids) for ids, _ in batch_rows)
    model.eval()
    if kept:
        keep_activations(layers, 0, 1.0, 1)  # back to every layer checkpointed
    return TrainResult(
        loss=sum(losses) / len(losses), last_loss=losses[-1], steps=cfg.steps,
        num_examples=len(examples), tokens=tokens, seconds=time.perf_counter() - start,
        layers_kept=sum(kept) / len(kept) if kept else 0.0,
    )


def checkpointed_layers(causal_lm: Any) -> list[Any]:
    """The decoder layers activation checkpointing wraps (transformers' ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in causal_lm.modules() if isinstance(m, GradientCheckpointingLayer)]


def row_length(batch: dict[str, torch.Tensor]) -> int:
    """The longest row of a batch: packed rows restart ``position_ids`` at 0, padded rows are columns."""
    if "position_ids" in batch:
        return int(batch["position_ids"].max()) + 1
    return batch["input_ids"].shape[1]


def keep_activations(layers: list[Any], budget_bytes: float, bytes_per_token: float, tokens: int) -> int:
    """Let the last layers whose activations fit in ``budget_bytes`` for a step of ``tokens`` keep
    them; every other layer recomputes. Returns how many keep them.

    The last ones: the backward pass is done with them (and frees their activations) before it
    recomputes any earlier layer, so a recomputed layer's activations never sit beside theirs.
    """
    keep = min(len(layers), int(budget_bytes // max(bytes_per_token * tokens, 1.0)))
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < len(layers) - keep
    return keep


def layer_bytes_per_token(causal_lm: Any, packed: bool = True, row_tokens: int = 0) -> float:
    """Bytes autograd keeps per token for one decoder layer run without checkpointing, for rows of
    ``row_tokens`` (padded batches: attention that keeps a (rows, heads, L, L) matrix costs more per
    token as rows grow); ``packed``: rows end to end (``pack``), else padded (``collate``).

    Measured, not modelled: what a layer keeps depends on the architecture, the LoRA targets, the
    dtype and the attention path. Two probe forwards of the decoder (rows of 8 and 16 tokens) give
    a per-token cost ``a + b * L``, memoised on the model; they run under a forked RNG, so they draw
    nothing from the training's dropout stream.
    """
    memo = causal_lm.__dict__.setdefault("_fedpt_layer_bytes_per_token", {})
    if packed not in memo:
        short, long = (_probe_layer_bytes(causal_lm, packed, rows) for rows in (8, 16))
        slope = max(long - short, 0.0) / 8
        memo[packed] = (short - 8 * slope, slope)
    base, slope = memo[packed]
    return base + slope * row_tokens


def _probe_layer_bytes(causal_lm: Any, packed: bool, row_tokens: int) -> float:
    """The most any decoder layer keeps per token in a forward of two rows of ``row_tokens``
    (one half padded, unless ``packed``), parameters not counted."""
    layers = checkpointed_layers(causal_lm)
    flags = [layer.gradient_checkpointing for layer in layers]
    parameters = {p.untyped_storage().data_ptr() for p in causal_lm.parameters()}
    kept: list[dict[int, int]] = [{} for _ in layers]
    current: list[int | None] = [None]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in parameters:
            kept[current[0]][storage.data_ptr()] = storage.nbytes()  # a storage saved twice counts once
        return tensor

    def enter(index: int) -> Any:
        return lambda *_: current.__setitem__(0, index)

    hooks = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda *_: current.__setitem__(0, None)) for layer in layers]
    try:
        for layer in layers:
            layer.gradient_checkpointing = False
        if packed:  # two rows end to end
            inputs = {"input_ids": torch.zeros((1, 2 * row_tokens), dtype=torch.long),
                      "position_ids": torch.arange(row_tokens).repeat(2).unsqueeze(0)}
        else:  # two rows, one half padding: attention gets a mask
            mask = torch.ones((2, row_tokens), dtype=torch.long)
            mask[1, row_tokens // 2:] = 0
            inputs = {"input_ids": torch.zeros((2, row_tokens), dtype=torch.long), "attention_mask": mask}
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            causal_lm.get_decoder()(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, flag in zip(layers, flags):
            layer.gradient_checkpointing = flag
    # A storage several layers keep (the attention mask, the rotary tables) is made once and is
    # there with checkpointing too: not a cost of keeping a layer.
    shared = {ptr for i, a in enumerate(kept) for b in kept[i + 1:] for ptr in a.keys() & b.keys()}
    own = [sum(n for ptr, n in k.items() if ptr not in shared) for k in kept]
    return max(own, default=0) / (2 * row_tokens)
