"""Proxy-tuning (step 4 of a FedPT round) and the batched decoding loop every model uses.

    z_proxy = z_large + alpha * (z_small_tuned - z_small_base)

``ProxyTunedLM`` is itself a ``LogitSource``: generation, evaluation and distillation treat
the proxy-tuned large LM like any other model. It reads only the large model's logits,
never its weights. ``decode`` is the one sampling loop (greedy or temperature / top-p /
top-k / no-repeat-ngram), left padding, EOS stop, spelled out as in nanoGPT's ``generate``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from fedpt.models.logits import LogitSource


def proxy_logits(z_large: torch.Tensor, z_diff: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shift the large LM's logits by alpha times what tuning changed in the small LM,
    ``z_diff = z_small_tuned - z_small_base`` (fp32)."""
    return z_large.float() + alpha * z_diff.float()


class LogitDiff(Protocol):
    """``z_small_tuned - z_small_base``, incrementally (``prefill``/``step``) or for whole sequences."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor: ...


class TwoSourceDiff:
    """The difference of any two LogitSources (two models, two caches): the plain formulation."""

    def __init__(self, tuned: LogitSource, base: LogitSource) -> None:
        self.tuned, self.base = tuned, base

    @property
    def holds_cores(self) -> bool:
        return holds_cores(self.tuned) or holds_cores(self.base)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tuned.prefill(input_ids, attention_mask) - self.base.prefill(input_ids, attention_mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tuned.step(tokens) - self.base.step(tokens)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        return (self.tuned.score(input_ids, attention_mask, keep_last)
                - self.base.score(input_ids, attention_mask, keep_last))

    def retire_rows(self, rows: torch.Tensor) -> None:
        retire_rows(self.tuned, rows)
        retire_rows(self.base, rows)

    def reserve_new_tokens(self, count: int) -> None:
        reserve_new_tokens(self.tuned, count)
        reserve_new_tokens(self.base, count)

    def close(self) -> None:
        for source in (self.tuned, self.base):
            getattr(source, "close", lambda: None)()


def holds_cores(source: object) -> bool:
    """True when ``source`` runs its own thread pool over every core (llama.cpp: its threads spin
    between steps), so nothing else should compute beside it."""
    return bool(getattr(source, "holds_cores", False))


class StepOverlapTrial:
    """Whether a proxy step should run the large LM and the small diff at once, decided by timing.

    At batch 1 on a CPU both steps read their weights at the rate one core gets (torch's fp32
    matrix-vector products barely use a second thread: 10.6 GB/s on 1 or 2 threads on the AVX2
    EPYC), and a remote large LM waits on the network: run side by side, the proxy step costs
    about the large step alone. A wide batch is bound by compute, where two thread teams on the
    same cores only crowd each other. Which holds depends on the CPU and the batch, so the first
    ``2 * trials`` steps of a batch size alternate (sequential first) and the faster mode by best
    step time is kept for that size. Both modes compute the same numbers; only the time differs.
    """

    def __init__(self, trials: int = 2, clock: Callable[[], float] = time.perf_counter) -> None:
        self.trials, self.clock = trials, clock
        self.chosen: dict[int, bool] = {}  # rows -> overlap
        self.best: dict[int, dict[bool, float]] = {}  # rows -> mode -> best step seconds
        self.runs: dict[int, int] = {}

    def mode(self, rows: int) -> bool:
        """The mode the next step of ``rows`` rows should run in (True: overlapped)."""
        return self.chosen.get(rows, self.runs.get(rows, 0) % 2 == 1)

    def record(self, rows: int, overlap: bool, seconds: float) -> None:
        if rows in self.chosen:
            return
        best = self.best.setdefault(rows, {})
        best[overlap] = min(best.get(overlap, float("inf")), seconds)
        self.runs[rows] = self.runs.get(rows, 0) + 1
        if overlap and seconds > 1.5 * best.get(False, float("inf")):
            self.chosen[rows] = False  # thread teams crowding each other: no second try
        elif self.runs[rows] >= 2 * self.trials:
            # overlap must win clearly: sequential uses fewer threads for the same numbers
            self.chosen[rows] = best[True] < 0.95 * best[False]


class ProxyTunedLM:
    """The large LM steered by what tuning changed in the small LM; one KV cache per model.

    ``diff`` is ``TwoSourceDiff(tuned, base)`` or, faster, ``MixedAdapterDiff(peft_model)``.
    ``overlap``: run each decoding step's large-LM and small-LM parts at once (the small one in a
    worker thread); None (default) decides per batch size by timing (``StepOverlapTrial``), never
    beside a source that holds every core (llama.cpp). Prefill and scoring run at once only beside
    a remote large LM (its ``remote`` attribute: the wait is the network's and another machine's);
    locally they are bound by compute.
    """

    def __init__(self, large: LogitSource, diff: LogitDiff, alpha: float, overlap: bool | None = None) -> None:
        self.large, self.diff, self.alpha = large, diff, alpha
        if holds_cores(large) or holds_cores(diff):
            overlap = False
        self.overlap = overlap
        self.trial = StepOverlapTrial() if overlap is None else None
        self._worker: ThreadPoolExecutor | None = None

    def _combine(self, call: str, *args: torch.Tensor | int) -> torch.Tensor:
        z_large = getattr(self.large, call)(*args).float()
        if self.alpha == 0.0:  # exactly the large model (and no wasted small-model passes)
            return z_large
        return proxy_logits(z_large, getattr(self.diff, call)(*args), self.alpha)

    def _whole(self, call: str, *args: torch.Tensor | int) -> torch.Tensor:
        """Prefill or score: at once beside a remote large LM (unless ``overlap=False``), else in turn."""
        if self.alpha != 0.0 and self.overlap is not False and getattr(self.large, "remote", False):
            return self._overlapped(call, *args)
        return self._combine(call, *args)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._whole("prefill", input_ids, attention_mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0 or self.overlap is False:
            return self._combine("step", tokens)
        if self.trial is None:
            return self._overlapped("step", tokens)
        rows = len(tokens)
        overlap = self.trial.mode(rows)
        start = self.trial.clock()
        logits = self._overlapped("step", tokens) if overlap else self._combine("step", tokens)
        self.trial.record(rows, overlap, self.trial.clock() - start)
        return logits

    def _overlapped(self, call: str, *args: torch.Tensor | int) -> torch.Tensor:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="fedpt-proxy-diff")
        # thread-local state does not follow into the worker: give it the caller's thread count and modes
        future = self._worker.submit(_as_caller, (torch.get_num_threads(), torch.is_inference_mode_enabled(),
                                                  torch.is_grad_enabled()), getattr(self.diff, call), *args)
        try:
            z_large = getattr(self.large, call)(*args).float()
        except BaseException:
            wait([future])  # the small model's part must not outlive the call
            raise
        return proxy_logits(z_large, future.result(), self.alpha)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        return self._whole("score", input_ids, attention_mask, keep_last)

    def retire_rows(self, rows: torch.Tensor) -> None:
        retire_rows(self.large, rows)
        retire_rows(self.diff, rows)

    def reserve_new_tokens(self, count: int) -> None:
        reserve_new_tokens(self.large, count)
        reserve_new_tokens(self.diff, count)

    def close(self) -> None:
        for part in (self.large, self.diff):
            getattr(part, "close", lambda: None)()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None


def _as_caller(state: tuple[int, bool, bool], fn: Callable[..., Any], *args: Any) -> Any:
    threads, inference, grad = state
    torch.set_num_threads(threads)
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return fn(*args)


def retire_rows(source: object, rows: torch.Tensor) -> None:
    """Tell ``source`` that the rows set in ``rows`` (B,) bool will not be read again this session.

    Optional for a source: llama.cpp then leaves them out of every later step (a CPU's wide
    decoding steps are bound by the FLOPs of their rows, and a row that stopped early would
    otherwise cost them until the batch's last row stops); their logits come back as zeros.
    Others ignore it.
    """
    method = getattr(source, "retire_rows", None)
    if method is not None:
        method(rows)


def reserve_new_tokens(source: object, count: int) -> None:
    """Tell ``source`` that the session it is about to start decodes at most ``count`` new tokens
    per row after the prompt.

    Optional for a source: llama.cpp then sizes each row's KV cache to its prompt plus ``count``
    instead of a generous default (512), which on a 24-row batch of the real pair is a few hundred
    MB per model. Others ignore it.
    """
    method = getattr(source, "reserve_new_tokens", None)
    if method is not None:
        method(count)


@dataclass
class Decoding:
    """How to pick tokens. ``do_sample=False`` is greedy; top_k=0 and top_p=1 disable those filters."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0
    seed: int = 0


def _processors(cfg: Decoding):
    from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    return procs


class DecodeSession:
    """One batch decoded token by token: ``decode`` runs it to the end, ``fedpt serve`` streams it.

    The first ``advance`` prefills the source, each later one steps it with the tokens just
    picked. Rows that hit EOS (or that the caller ``finish``es, e.g. on a stop string) get
    ``pad_id`` from then on.
    """

    def __init__(self, source: LogitSource, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 eos_ids: list[int], pad_id: int, cfg: Decoding) -> None:
        self.source, self.attention_mask, self.pad_id, self.cfg = source, attention_mask, pad_id, cfg
        self.processors = _processors(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.eos = torch.tensor(eos_ids, dtype=torch.long)
        self.sequences = input_ids
        self.finished = torch.zeros(len(input_ids), dtype=torch.bool)
        self.steps = 0
        self._last: torch.Tensor | None = None
        reserve_new_tokens(source, cfg.max_new_tokens)

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.steps >= self.cfg.max_new_tokens

    def finish(self, row: int) -> None:
        self.finished[row] = True
        retire_rows(self.source, self.finished)

    @torch.inference_mode()
    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row; returns it (B,) and the raw logits (B, V) it was picked from."""
        if self._last is None:
            logits = self.source.prefill(self.sequences, self.attention_mask)  # (B, V)
        else:
            logits = self.source.step(self._last)
        scores = self.processors(self.sequences, logits)
        # A top-k large LM leaves only k finite candidates (-inf elsewhere): if the processors
        # (no-repeat-ngram) remove all of them, keep that row's unfiltered candidates rather
        # than sampling from an all -inf row (NaN) or taking argmax = token 0.
        emptied = ~torch.isfinite(scores).any(dim=-1)
        if emptied.any():
            scores = torch.where(emptied[:, None], logits, scores)
        if self.cfg.do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(self.finished, torch.full_like(next_tokens, self.pad_id), next_tokens)  # (B,)
        self.sequences = torch.cat([self.sequences, next_tokens[:, None]], dim=1)
        newly = torch.isin(next_tokens, self.eos) & ~self.finished
        self.finished |= newly
        if newly.any():
            retire_rows(self.source, self.finished)
        self.steps += 1
        self._last = next_tokens
        return next_tokens, logits

    def close(self) -> None:
        getattr(self.source, "close", lambda: None)()


@torch.inference_mode()
def decode(
    source: LogitSource,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eos_ids: list[int],
    pad_id: int,
    cfg: Decoding,
    step_logits: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per row from left-padded prompts; returns new ids without EOS.

    With ``step_logits``, each step's raw logits (B, V) are appended to it: step j's row b is the
    distribution the j-th new token of row b (or its stop token) was picked from.
    """
    from fedpt import profile

    session = DecodeSession(source, input_ids, attention_mask, eos_ids, pad_id, cfg)
    new_tokens: list[torch.Tensor] = []
    try:
        while not session.done:
            tokens, logits = session.advance()
            new_tokens.append(tokens)
            if step_logits is not None:
                step_logits.append(logits)
    finally:
        session.close()
    out = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in range(len(input_ids))]
    responses = [_until_eos(row, set(eos_ids)) for row in out]
    # prefill = 1 pass over the prompts; every later step reads the weights once for all rows
    profile.count(batches=1, rows=len(input_ids), prompt_tokens=int(attention_mask.sum()),
                  decode_steps=max(len(new_tokens) - 1, 0), new_tokens=sum(len(r) for r in responses))
    return responses


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the end-of-text token where the vocabulary has one (Qwen ends turns either way)."""
    ids = {tokenizer.eos_token_id}
    vocab = tokenizer.get_vocab()
    for token in ("<|endoftext|>", "<|im_end|>"):
        if token in vocab:
            ids.add(vocab[token])
    return sorted(i for i in ids if i is not None)


def generate_ids(
    source: LogitSource, tokenizer, prompts: list[str], cfg: Decoding, batch_size: int, max_prompt_tokens: int,
    on_batch: Callable[[list[list[int]], list[torch.Tensor]], None] | None = None,
    on_prompts: Callable[[int], None] | None = None, keep_step_logits: bool = True,
) -> list[list[int]]:
    """Decode every prompt in batches of ``batch_size``; returns new token ids per prompt.

    ``on_batch(responses, step_logits)`` sees each batch's responses and its steps' raw logits
    (``decode``'s ``step_logits``; None with ``keep_step_logits=False``, which spares holding a
    batch's (steps, B, V) logits) as soon as the batch is done, so a caller can keep what it
    needs of them without holding every batch's logits at once.
    ``on_prompts(n)`` is told after each batch how many prompts it decoded (progress; keeps no logits).
    """
    from fedpt.data.prompts import encode_prompts_left

    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts_left(tokenizer, prompts[start: start + batch_size], max_prompt_tokens)
        batch_cfg = replace(cfg, seed=cfg.seed + start)  # distinct random streams per batch
        steps: list[torch.Tensor] | None = [] if on_batch is not None and keep_step_logits else None
        responses = decode(source, ids, mask, stop_token_ids(tokenizer), tokenizer.pad_token_id, batch_cfg, steps)
        if on_batch is not None:
            on_batch(responses, steps)
        out += responses
        if on_prompts is not None:
            on_prompts(len(responses))
    return out
