"""Step 5 of a FedPT round: distill the proxy-tuned large LM into the averaged small LM.

On the server's prompt pool (instructions only, disjoint from device and evaluation data):

1. the teacher (``ProxyTunedLM`` built from the averaged adapter) writes a response per prompt;
2. its next-token distribution at temperature T over each response position is kept from that
   very decoding (each token was picked from it), not computed again by re-reading prompt and
   response (the teacher is fixed during distillation: its "tuned" half is the pre-distillation
   adapter);
3. the student's LoRA (the same averaged adapter) takes ``steps`` AdamW steps on
   ``(1 - ce_weight) * T^2 * KL(p_teacher || p_student) + ce_weight * CE(teacher tokens)``
   (forward KL as in torchtune's ``ForwardKLLoss``; T^2 keeps gradient scale independent of T).

The optimizer is fresh every round, like the devices' (its moments belong to an adapter that
FedAvg replaces next round).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedpt import profile
from fedpt.config import DataConfig, DistillConfig
from fedpt.data.prompts import IGNORE_INDEX, collate, encode_prompt
from fedpt.models.logits import LogitSource, positions_from_mask
from fedpt.proxy import Decoding, generate_ids


@dataclass
class KDBatch:
    input_ids: torch.Tensor  # (B, T) left-padded prompt + teacher response
    attention_mask: torch.Tensor  # (B, T)
    select: torch.Tensor  # (B, K) bool over the last K positions: those whose *next* token is a response token
    targets: torch.Tensor  # (N,) the teacher's tokens at those positions
    teacher_logprobs: torch.Tensor  # (N, V) log p_teacher at temperature T (bf16 for big vocabularies)
    # Packed (``packed``): the rows end to end, (1, T) with positions restarting per row, no padding
    positions: torch.Tensor | None = None


@dataclass
class DistillResult:
    kl_before: float | None  # mean forward KL over the pool's response tokens, before the student steps
    kl_after: float | None  # ... and after (None unless distill.pool_kl: two extra student passes)
    loss: float  # mean training loss over the steps
    steps: int
    teacher_tokens: int
    seconds: float


def response_logprobs(responses: list[list[int]], step_logits: list[torch.Tensor], max_new_tokens: int,
                      temperature: float) -> list[torch.Tensor]:
    """Per response, log p_teacher at temperature T at the positions ``build_kd_batches`` selects:
    one per response token, plus the stop token's when the response stopped before the budget.

    ``step_logits`` are the decoding's steps for these rows (``decode``'s ``step_logits``): step j
    holds the distribution the j-th token (or the stop token, at j = len) was picked from.
    """
    out = []
    for row, response in enumerate(responses):
        positions = len(response) + (len(response) < max_new_tokens)  # the stop token's too
        logits = torch.stack([step[row] for step in step_logits[:positions]]).float()
        out.append(_teacher_store(F.log_softmax(logits / temperature, dim=-1)))
    return out


def _teacher_store(logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs.to(torch.bfloat16 if logprobs.shape[-1] > 65536 else torch.float32)  # memory on real vocabularies


def build_kd_batches(
    teacher: LogitSource, tokenizer: Any, prompts: list[str], responses: list[list[int]],
    cfg: DistillConfig, data_cfg: DataConfig, teacher_logprobs: list[torch.Tensor] | None = None,
) -> list[KDBatch]:
    """The student's batches with the teacher's log-probabilities at the response positions.

    ``teacher_logprobs`` (per response, from ``response_logprobs``) are those the teacher decoded
    with; without them the teacher scores prompt + response again (``teacher.score``).
    """
    batches = []
    for start in range(0, len(prompts), cfg.batch_size):
        rows, longest = [], 0
        for prompt, response in zip(prompts[start: start + cfg.batch_size], responses[start: start + cfg.batch_size]):
            # A response shorter than the budget ended on EOS, which the student must learn too.
            text_ids = response if len(response) >= cfg.max_new_tokens else response + [tokenizer.eos_token_id]
            prompt_ids = encode_prompt(tokenizer, prompt, data_cfg.max_prompt_tokens)
            rows.append((prompt_ids + text_ids, [IGNORE_INDEX] * len(prompt_ids) + text_ids))
            longest = max(longest, len(text_ids))
        # Left padding puts every response in the last columns: only the last K positions need
        # logits (K = longest response + 1), not all T of them over a 150k-token vocabulary.
        batch = collate(rows, tokenizer.pad_token_id, left=True)
        next_labels = torch.full_like(batch["labels"], IGNORE_INDEX)
        next_labels[:, :-1] = batch["labels"][:, 1:]  # logits at t predict token t+1
        keep = min(longest + 1, next_labels.shape[1])
        select = next_labels[:, -keep:] != IGNORE_INDEX
        targets = next_labels[:, -keep:][select]
        if teacher_logprobs is not None:
            logprobs = torch.cat(teacher_logprobs[start: start + cfg.batch_size])  # row-major, as [select]
            if len(logprobs) != len(targets):
                raise RuntimeError(f"{len(logprobs)} teacher positions for {len(targets)} response tokens")
        else:
            # clone(): score() runs in inference mode, and autograd may not save inference tensors.
            logits = teacher.score(batch["input_ids"], batch["attention_mask"], keep_last=keep)[select].clone()
            logprobs = _teacher_store(F.log_softmax(logits / cfg.temperature, dim=-1))  # (N, V)
        batches.append(KDBatch(batch["input_ids"], batch["attention_mask"], select, targets, logprobs))
    return batches


def kd_loss(student_logits: torch.Tensor, batch: KDBatch, temperature: float, ce_weight: float) -> torch.Tensor:
    """(1 - w) * T^2 * KL(p_t || p_s) + w * CE, averaged over response tokens. Logits (N, V)."""
    student_logprobs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logprobs = batch.teacher_logprobs.float()
    # A top-k teacher (fedpt.models.openai_topk) is -inf outside its support: 0 * log 0 = 0 there,
    # not 0 * (-inf) = NaN. The KL then runs over the teacher's support only, as FedMKT's.
    support = torch.isfinite(teacher_logprobs)
    teacher_logprobs = teacher_logprobs.masked_fill(~support, 0.0)
    kl = (teacher_logprobs.exp() * support * (teacher_logprobs - student_logprobs)).sum(-1).mean()
    loss = (1.0 - ce_weight) * temperature**2 * kl
    if ce_weight > 0:
        loss = loss + ce_weight * F.cross_entropy(student_logits.float(), batch.targets)
    return loss


def packed(batch: KDBatch) -> KDBatch:
    """The same batch without its left padding (``distill.pack_rows``): the rows' real tokens end
    to end in one sequence, positions restarting per row (``fedpt.data.prompts.pack``'s layout),
    ``select`` marking the same positions in the same row-major order as the targets."""
    mask = batch.attention_mask.bool()
    select = torch.zeros_like(mask)
    select[:, mask.shape[1] - batch.select.shape[1]:] = batch.select
    input_ids = batch.input_ids[mask][None]  # boolean indexing reads row by row: (1, real tokens)
    positions = positions_from_mask(batch.attention_mask)[mask][None]  # 0..n-1 within each row
    return KDBatch(input_ids, torch.ones_like(input_ids), select[mask][None], batch.targets, batch.teacher_logprobs,
                   positions=positions)


def _student_logits(student: Any, batch: KDBatch) -> torch.Tensor:
    if batch.positions is not None:
        # No attention mask: transformers reads the restarting positions as packed rows and keeps
        # each row's attention inside it; the head runs on the selected positions only.
        out = student(input_ids=batch.input_ids, position_ids=batch.positions, use_cache=False,
                      logits_to_keep=batch.select[0].nonzero().flatten())
        return out.logits[0]  # (N, V)
    out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=positions_from_mask(batch.attention_mask), use_cache=False,
                  logits_to_keep=batch.select.shape[1])
    return out.logits[batch.select]  # (N, V)


@torch.no_grad()
def pool_kl(student: Any, batches: list[KDBatch], temperature: float) -> float:
    """Token-weighted mean forward KL of the student against the cached teacher, over the pool."""
    student.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = int(batch.select.sum())
        total += kd_loss(_student_logits(student, batch), batch, temperature, 0.0).item() / temperature**2 * n
        count += n
    return total / max(count, 1)


def _timed_pool_kl(student: Any, batches: list[KDBatch], temperature: float) -> float:
    with profile.phase("kd pool KL (distill.pool_kl)"):
        profile.count(passes=1, tokens=sum(int(b.attention_mask.sum()) for b in batches))
        return pool_kl(student, batches, temperature)


def distill(
    teacher: LogitSource, student: Any, tokenizer: Any, prompts: list[str],
    cfg: DistillConfig, data_cfg: DataConfig, seed: int, after_step: Callable[[int], None] | None = None,
) -> DistillResult:
    """Teacher responses, cached teacher distributions, then ``cfg.steps`` student LoRA steps.

    ``after_step(step)`` is called after each optimizer step (progress, fault injection).
    """
    start = time.perf_counter()
    decoding = Decoding(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.teacher_decoding == "sample", seed=seed)
    kept: list[torch.Tensor] = []  # the teacher's log-probabilities, batch by batch as it decodes
    with profile.phase("kd teacher decoding"):
        responses = generate_ids(teacher, tokenizer, prompts, decoding, cfg.teacher_batch_size or cfg.batch_size,
                                 data_cfg.max_prompt_tokens,
                                 on_batch=lambda rows, steps: kept.extend(
                                     response_logprobs(rows, steps, cfg.max_new_tokens, cfg.temperature)))
        batches = build_kd_batches(teacher, tokenizer, prompts, responses, cfg, data_cfg, teacher_logprobs=kept)
    if cfg.pack_rows:
        batches = [packed(batch) for batch in batches]
    kl_before = _timed_pool_kl(student, batches, cfg.temperature) if cfg.pool_kl else None
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    losses = []
    student.train()
    for step in range(cfg.steps):
        batch = batches[step % len(batches)]
        with profile.phase("kd student steps"):
            loss = kd_loss(_student_logits(student, batch), batch, cfg.temperature, cfg.ce_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            profile.count(steps=1, tokens=int(batch.attention_mask.sum()))
        if after_step is not None:
            after_step(step)
    student.eval()
    return DistillResult(
        kl_before=kl_before, kl_after=_timed_pool_kl(student, batches, cfg.temperature) if cfg.pool_kl else None,
        loss=sum(losses) / len(losses), steps=cfg.steps,
        teacher_tokens=sum(int(b.select.sum()) for b in batches), seconds=time.perf_counter() - start,
    )
