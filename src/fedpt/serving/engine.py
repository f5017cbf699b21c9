"""The generation worker of ``fedpt serve``: one thread steps every active request in turn.

Each request is one ``fedpt.proxy.DecodeSession`` (the project's only sampler) over its own
KV cache; a request with several prompts decodes them as one left-padded batch. The worker
gives every active request one token per turn (round robin), so no client waits for another's
whole answer, and streams per-row deltas (text, token log-probabilities, finish reason) back
through a callback. All model calls, here and in the logits service, hold ``ServedModel.lock``:
one computation at a time keeps torch's thread pool from being oversubscribed.

Log-probabilities are those of the raw next-token distribution (log-softmax of the model's, or
the proxy's, logits before temperature / top-p), as vLLM reports them by default.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpt.proxy import DecodeSession, Decoding

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)  # top-k (id, logprob), best first


@dataclass
class RowDelta:
    """What one prompt's row produced since the last event."""

    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


@dataclass
class Event:
    kind: str  # "prompt" (echo), "step", "done" or "error"
    rows: list[RowDelta] = field(default_factory=list)
    message: str = ""


@dataclass
class GenerationRequest:
    prompts: list[list[int]]  # token ids, one list per prompt
    decoding: Decoding
    deliver: Callable[[Event], None]  # called from the worker thread
    logprobs: int | None = None  # top-k per generated token (0: only the chosen token's)
    echo_logprobs: bool = False  # also score the prompt tokens
    stop: list[str] = field(default_factory=list)
    alpha: float | None = None  # proxy strength for a served run (None: the run's)
    cancelled: bool = False  # set by the HTTP side when the client goes away


class _Row:
    """Text bookkeeping of one generated sequence: stop strings and incomplete UTF-8 held back."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already delivered
        self.finish_reason: str | None = None
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int, is_eos: bool, last_step: bool) -> str:
        """Append a token; returns the text that is now safe to deliver."""
        if not is_eos:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, self.sent - self.holdback)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.finish_reason, text = "stop", text[:cut]
        elif is_eos:
            self.finish_reason = "stop"
        elif last_step:
            self.finish_reason = "length"
        if self.finish_reason is None:  # keep back what may still become a stop string or a character
            safe = len(text) - self.holdback
            while safe > self.sent and text[safe - 1] == REPLACEMENT:
                safe -= 1
            text = text[:max(safe, self.sent)]
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Log-probability of each row's chosen token and the row's top-k, from raw logits (B, V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if k > 0:
        top_lp, top_ids = logp.topk(k, dim=-1)
        tops = [list(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lp.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(int(t), lp, top) for t, lp, top in zip(chosen.tolist(), picked, tops)]


class Engine:
    """Owns the worker thread; ``submit`` a request and its events arrive through ``deliver``.

    ``gang`` > 1 makes an idle worker wait for that many requests before its first step (then
    they interleave from their first token on): a deterministic setting for tests and demos.
    """

    def __init__(self, served: Any, gang: int = 1) -> None:
        self.served, self.gang = served, gang
        self._incoming: queue.Queue[GenerationRequest] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fedpt-decode", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        self._incoming.put(request)

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Job] = []
        while True:
            while True:  # admit new requests; block while there is nothing (or not enough) to do
                idle = not any(job.started for job in active)
                must_wait = not active or (idle and len(active) < self.gang)
                try:
                    request = self._incoming.get(block=must_wait)
                except queue.Empty:
                    break
                active.append(_Job(self.served, request))
            for job in list(active):
                if not job.turn():
                    active.remove(job)


class _Job:
    """One request inside the worker: a DecodeSession plus per-row text state."""

    def __init__(self, served: Any, request: GenerationRequest) -> None:
        self.served, self.request = served, request
        self.rows = [_Row(served.tokenizer, request.stop) for _ in request.prompts]
        self.session: DecodeSession | None = None
        self.started = False

    def turn(self) -> bool:
        """One step (the first turn also prefills and echoes); False when the job is over."""
        request = self.request
        try:
            if request.cancelled:
                return self._end(None)
            if not self.started:
                self.started = True
                self._start()
            if self.session.done:
                return self._end(Event("done"))
            with self.served.lock:
                tokens, logits = self.session.advance()
                infos = token_logprobs(logits, tokens, request.logprobs or 0) if request.logprobs is not None \
                    else None
            eos = set(self.served.eos_ids)
            rows, last = [], self.session.steps >= request.decoding.max_new_tokens
            for i, row in enumerate(self.rows):
                if row.finish_reason is not None:
                    rows.append(RowDelta())
                    continue
                token = int(tokens[i])
                text = row.add(token, token in eos, last)
                if row.finish_reason is not None:
                    self.session.finish(i)  # a stop string ends the row like EOS does
                rows.append(RowDelta(text, [infos[i]] if infos else [], row.finish_reason))
            request.deliver(Event("step", rows))
            if self.session.done:
                return self._end(Event("done"))
            return True
        except Exception as err:  # noqa: BLE001 - one line to the client, the worker lives on
            return self._end(Event("error", message=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                                   if str(err) else type(err).__name__))

    def _start(self) -> None:
        from fedpt.data.prompts import collate

        request, served = self.request, self.served
        batch = collate([(ids, ids) for ids in request.prompts], served.tokenizer.pad_token_id, left=True)
        if request.echo_logprobs:
            with served.lock:
                request.deliver(Event("prompt", [RowDelta(tokens=self._prompt_logprobs(ids))
                                                 for ids in request.prompts]))
        source = served.source(request.alpha)
        self.session = DecodeSession(source, batch["input_ids"], batch["attention_mask"], served.eos_ids,
                                     served.tokenizer.pad_token_id, request.decoding)
        if request.decoding.max_new_tokens == 0:
            for row in self.rows:
                row.finish_reason = "length"

    def _prompt_logprobs(self, ids: list[int]) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (one row at a time:
        (T, V) fp32 scores of a 150k vocabulary are large)."""
        if len(ids) < 2:
            return [TokenLogprob(ids[0], None)] if ids else []
        source = self.served.source(self.request.alpha)
        tensor = torch.tensor([ids])
        scores = source.score(tensor, torch.ones_like(tensor))[0, :-1]  # (T-1, V): predicts ids[1:]
        getattr(source, "close", lambda: None)()
        return [TokenLogprob(ids[0], None)] + token_logprobs(scores, tensor[0, 1:], self.request.logprobs or 0)

    def _end(self, event: Event | None) -> bool:
        if self.session is not None:
            self.session.close()
        if event is not None:
            if event.kind == "done":
                event.rows = [RowDelta(finish_reason=row.finish_reason or "length") for row in self.rows]
            self.request.deliver(event)
        return False
