"""The large LM behind any OpenAI-compatible completions endpoint that returns top-k log-probabilities.

Commercial APIs, vLLM, llama.cpp's server and ``fedpt serve`` expose at most the top-k
log-probabilities of the next token through ``/v1/completions`` (``max_tokens=1, logprobs=k``).
``OpenAITopKSource`` is a ``LogitSource`` built on exactly that call and nothing more:

- ``prefill``/``step``: one request per decoding step, the whole (unpadded) sequence of every
  row resent as a token-id prompt. The API is stateless (no KV cache of ours on the server), so
  generating N tokens after a P-token prompt sends N·P + N²/2 prompt tokens: without the
  server's own prefix caching (vLLM has it, ``fedpt serve``'s OpenAI endpoint does not) each
  step costs a prefill of the whole sequence.
- ``score``: whole-sequence scoring for distillation with ``echo=True, max_tokens=1,
  logprobs=k``: the top-k of every prompt position plus the one after the last.

The approximation. The (B, V) tensor returned holds ``log p_L(v)`` for the k tokens the server
returned (the set S) and ``-inf`` elsewhere. ``ProxyTunedLM`` adds ``alpha * (z_tuned - z_base)``
index by index, so the proxy is automatically restricted to S and softmax renormalises over S:

    p_topk(v) = exp(log p_L(v) + alpha * d(v)) / sum_{u in S} exp(log p_L(u) + alpha * d(u)),  v in S
    p_topk(v) = 0,  v not in S

which is exactly the full-logits proxy distribution conditioned on S (log-probs and logits of
the large LM differ by a per-position constant that cancels). Hence
``KL(p_topk || p_full) = -log p_full(S)``: the approximation costs exactly the proxy mass that
falls outside the large LM's top-k. Greedy decoding picks ``argmax p_full`` whenever it lies in S.
Distillation uses the same restricted teacher (forward KL over S, as FedMKT distils top-k
teachers): ``fedpt.distill.kd_loss`` treats ``-inf`` teacher entries as zero probability.

Tokens come back as strings. With vLLM's ``return_tokens_as_token_ids`` extension (sent
always; servers that reject it are retried once without it) they read ``token_id:N``. Otherwise
each string is mapped to an id through the tokenizer's byte-level vocabulary (``TokenMapper``);
strings that match no single token (a partial UTF-8 byte shown as U+FFFD, two tokens collapsing
to one JSON key) are dropped and counted in ``stats.unmapped``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from typing import Any

import torch

from fedpt.errors import FedPTError, ServiceError

TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids format
BYTES_PREFIX = "bytes:"  # OpenAI's format for tokens that are not valid UTF-8, e.g. "bytes:\\xe6\\x9d"


# -- the approximation, as pure tensor code ---------------------------------------------------

def topk_to_logits(rows: list[dict[int, float]], vocab_size: int) -> torch.Tensor:
    """(B, V) fp32: each row's returned log-probs at their ids, ``-inf`` for every other token."""
    out = torch.full((len(rows), vocab_size), -math.inf)
    for i, row in enumerate(rows):
        if not row:
            raise FedPTError("the large LM returned no usable top-k log-probability for a position "
                             "(all returned tokens were unmappable): use a server with return_tokens_as_token_ids")
        out[i, torch.tensor(list(row), dtype=torch.long)] = torch.tensor(list(row.values()), dtype=torch.float32)
    return out


def restrict_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """What a top-k API shows of full logits (..., V): the top-k log-probs, ``-inf`` elsewhere."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return torch.full_like(logprobs, -math.inf).scatter(-1, ids, values)


class TopKRestricted:
    """A local ``LogitSource`` seen through a top-k API: for measuring the approximation offline
    (the same restriction ``OpenAITopKSource`` receives from a server, at local-KV-cache speed)."""

    def __init__(self, inner: Any, k: int) -> None:
        self.inner, self.k = inner, k

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return restrict_topk(self.inner.prefill(input_ids, attention_mask), self.k)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return restrict_topk(self.inner.step(tokens), self.k)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        return restrict_topk(self.inner.score(input_ids, attention_mask, keep_last), self.k)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()


# -- token strings -> ids -----------------------------------------------------------------------

class TokenMapper:
    """Token strings as servers return them -> ids, through the tokenizer's byte-level vocabulary.

    A byte-level BPE token (GPT-2, Qwen, Llama 3) is a sequence of bytes spelled with GPT-2's
    byte-to-unicode table; a server returns the UTF-8 text of those bytes. Added/special tokens
    are their text. Where two ids share the same bytes, the lower id wins (``ambiguous`` counts them).
    """

    def __init__(self, tokenizer: Any) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        special = {token.content if hasattr(token, "content") else str(token)
                   for token in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self.by_bytes: dict[bytes, int] = {}
        self.ambiguous = 0
        for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token not in special and all(char in byte_of for char in token):
                raw = bytes(byte_of[char] for char in token)
            else:
                raw = token.encode("utf-8")
            if raw in self.by_bytes:
                self.ambiguous += 1
                continue
            self.by_bytes[raw] = token_id

    def to_id(self, text: str) -> int | None:
        """The id of one returned token string, or None when no single token spells it."""
        if text.startswith(TOKEN_ID_PREFIX):
            try:
                return int(text[len(TOKEN_ID_PREFIX):])
            except ValueError:
                return None
        if text.startswith(BYTES_PREFIX):
            try:
                raw = text[len(BYTES_PREFIX):].encode("latin-1").decode("unicode_escape").encode("latin-1")
            except (UnicodeError, ValueError):
                return None
            return self.by_bytes.get(raw)
        if "\ufffd" in text:  # a lossy decode of partial UTF-8: many tokens print like this
            return None
        return self.by_bytes.get(text.encode("utf-8"))


# -- the backend --------------------------------------------------------------------------------

@dataclass
class TopKStats:
    """What the API cost and what the mapping lost, for reports."""

    requests: int = 0
    prompt_tokens: int = 0  # token ids sent (the stateless API's resending included)
    positions: int = 0  # next-token distributions received
    returned: int = 0  # top-k entries received
    unmapped: int = 0  # entries dropped: no id matched their token string
    collapsed: int = 0  # entries lost before we saw them: fewer than k distinct strings (JSON keys) came back
    seconds: float = 0.0  # time spent waiting for the server
    unmapped_examples: list[str] = field(default_factory=list)


class OpenAITopKSource:
    """A ``LogitSource`` over ``/v1/completions`` with ``logprobs=k`` (see the module docstring).

    Parameters
    ----------
    base_url:
        The server's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``.
    model:
        The ``model`` field of requests; ``""`` takes the single model ``/v1/models`` lists.
    k:
        Top-k log-probabilities per position (servers cap it: OpenAI at 5, vLLM at its
        ``--max-logprobs``, 20 by default).
    tokenizer:
        The small model's tokenizer (the large LM must share it), for mapping token strings.
    vocab_size:
        Width V of the (B, V) logits returned: the small model's logit width.
    api_key:
        Sent as ``Authorization: Bearer``; ``None`` sends none.
    token_ids:
        Ask for ``return_tokens_as_token_ids`` (``None``: ask, and fall back to byte-level
        mapping if the server refuses or ignores it; ``False``: never ask).
    """

    def __init__(self, base_url: str, model: str, k: int, tokenizer: Any, vocab_size: int,
                 api_key: str | None = None, timeout: float = 300.0, retries: int = 3,
                 token_ids: bool | None = None) -> None:
        import httpx

        if k < 1:
            raise FedPTError(f"model.large_topk must be >= 1, got {k}")
        self.base_url = base_url.rstrip("/")
        # More than the vocabulary is the whole distribution (and some servers fail on it).
        self.k, self.tokenizer, self.vocab_size, self.retries = min(k, vocab_size), tokenizer, vocab_size, retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.mapper = TokenMapper(tokenizer)
        self.token_ids_extension: bool | None = token_ids  # None: unknown until the first answer
        self.stats = TopKStats()
        self._rows: list[list[int]] = []
        self.model = model or self._only_model()

    @classmethod
    def from_config(cls, model_cfg: Any, tokenizer: Any, vocab_size: int) -> "OpenAITopKSource":
        """Build from ``[model]``: ``large_url``, ``large_api_key_file``, ``large_model_name``, ``large_topk``."""
        from fedpt.models.remote import read_api_key

        return cls(openai_base_url(model_cfg.large_url), model_cfg.large_model_name, model_cfg.large_topk, tokenizer,
                   vocab_size, api_key=read_api_key(model_cfg.large_api_key_file))

    def fork(self) -> "OpenAITopKSource":
        """A source for another decoding session on the same connection (the API is stateless:
        a session is just the sequences we resend); statistics are shared."""
        other = copy.copy(self)
        other._rows = []
        return other

    # -- LogitSource ----------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        return self._next_token_logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            raise RuntimeError("step() before prefill()")
        for row, token in zip(self._rows, tokens.tolist()):
            row.append(token)
        return self._next_token_logits()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        """(B, K, V) top-k logits at the last K positions of left-padded sequences (``echo=True``)."""
        rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        width = input_ids.shape[1]
        keep = keep_last or width
        choices = self._complete(rows, echo=True)
        out = torch.full((len(rows), keep, self.vocab_size), -math.inf)
        for i, (row, choice) in enumerate(zip(rows, choices)):
            tops = choice["logprobs"]["top_logprobs"]
            # Entry j is the distribution of token j given tokens < j (entry 0 is null); the one
            # after the prompt is the generated token's: len(row) + 1 entries in all.
            if len(tops) < len(row) + 1:
                raise FedPTError(f"the large LM at {self.base_url} returned {len(tops)} echoed positions for a "
                                 f"{len(row)}-token prompt: it does not support echo=True with logprobs, which "
                                 "distillation needs")
            # Left padding: real position t of a length-L row sits in column width - L + t, so
            # in the last `keep` columns at t - (L - keep).
            for t in range(max(0, len(row) - keep), len(row)):
                out[i, t - len(row) + keep] = topk_to_logits([self._parse_top(tops[t + 1])], self.vocab_size)[0]
        return out

    def close(self) -> None:
        self._rows = []

    # -- checks ---------------------------------------------------------------------------

    def check_vocabulary(self, probes: tuple[str, ...]) -> None:
        """Send probe texts with ``echo=True``: the server must tokenize them as our tokenizer does."""
        for probe in probes:
            choice = self._complete([probe], echo=True, top=1)[0]
            echoed = choice["logprobs"]["tokens"][:-1]  # the prompt's tokens, then the generated one
            ids = [self.mapper.to_id(text) for text in echoed]
            ours = (self.tokenizer(probe)["input_ids"], self.tokenizer(probe, add_special_tokens=False)["input_ids"])
            if ids not in ours:
                raise FedPTError(f"the large LM at {self.base_url} ('{self.model}') tokenizes {probe[:30]!r} "
                                 "differently from the small model's tokenizer; proxy-tuning needs one shared "
                                 "vocabulary: serve a large model of the small model's family")

    # -- HTTP -----------------------------------------------------------------------------

    def _next_token_logits(self) -> torch.Tensor:
        choices = self._complete(self._rows, echo=False)
        return topk_to_logits([self._parse_top(choice["logprobs"]["top_logprobs"][0]) for choice in choices],
                              self.vocab_size)

    def _complete(self, prompts: list, echo: bool, top: int | None = None) -> list[dict[str, Any]]:
        """One completions request for a batch of prompts; choices in prompt order."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                                "logprobs": top or self.k, "echo": echo}
        if self.token_ids_extension is not False:
            body["return_tokens_as_token_ids"] = True
        try:
            reply = self._post("/completions", body)
        except _Rejected as err:
            if "return_tokens_as_token_ids" not in body:
                raise FedPTError(err.message) from None
            # A strict server (OpenAI's own) refuses unknown fields: go on with byte-level mapping.
            self.token_ids_extension = False
            del body["return_tokens_as_token_ids"]
            try:
                reply = self._post("/completions", body)
            except _Rejected as again:
                raise FedPTError(again.message) from None
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) or any(not (c.get("logprobs") or {}).get("top_logprobs") for c in choices):
            raise FedPTError(f"the large LM at {self.base_url} answered without top-k log-probabilities "
                             f"({len(choices)} choices for {len(prompts)} prompts): it must support logprobs")
        self.stats.requests += 1
        self.stats.prompt_tokens += sum(len(p) for p in prompts if isinstance(p, list))
        return choices

    def _parse_top(self, top: dict[str, float] | None) -> dict[int, float]:
        """One position's ``{token string: logprob}`` -> ``{id: logprob}``, the k largest."""
        top = top or {}
        self.stats.positions += 1
        self.stats.returned += len(top)
        self.stats.collapsed += max(0, self.k - len(top))
        if self.token_ids_extension is None and top:
            self.token_ids_extension = next(iter(top)).startswith(TOKEN_ID_PREFIX)
        out: dict[int, float] = {}
        for text, logprob in sorted(top.items(), key=lambda item: -item[1])[: self.k]:
            token_id = self.mapper.to_id(text)
            if token_id is None or not 0 <= token_id < self.vocab_size:
                self.stats.unmapped += 1
                if not self.stats.unmapped_examples:  # one line per source, not one per token
                    print(f"warning: the large LM at {self.base_url} returned a token string no single token "
                          f"spells ({text!r}); such tokens are dropped and counted: use a server with "
                          "return_tokens_as_token_ids for exact ids", file=sys.stderr)
                if len(self.stats.unmapped_examples) < 5:
                    self.stats.unmapped_examples.append(text)
                continue
            out.setdefault(token_id, float(logprob))
        return out

    def _only_model(self) -> str:
        models = [m.get("id") for m in self._get("/models").get("data", [])]
        if len(models) != 1:
            raise FedPTError(f"the server at {self.base_url} serves {len(models)} models ({', '.join(models)}): "
                             "name one with model.large_model_name")
        return models[0]

    def _get(self, path: str) -> dict[str, Any]:
        return self._request("GET", path, None)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """Bounded retries on connection errors, 429 and 5xx; one clear line for everything else."""
        import httpx

        url = self.base_url + path
        delay, last = 0.5, ""
        for attempt in range(self.retries + 1):
            start = time.perf_counter()
            try:
                response = self.client.request(method, path, json=body)
            except httpx.HTTPError as err:
                last = f"cannot reach the large LM at {url} ({type(err).__name__}: {err}); is the server running? " \
                       "(model.large_url)"
            else:
                self.stats.seconds += time.perf_counter() - start
                if response.status_code in (401, 403):
                    raise FedPTError(f"the large LM at {url} refused the API key (HTTP {response.status_code}): "
                                     "check model.large_api_key_file")
                if response.status_code == 429 or response.status_code >= 500:
                    last = f"the large LM at {url} failed (HTTP {response.status_code}: {_message(response)})"
                elif response.status_code >= 400:
                    raise _Rejected(f"the large LM at {url} rejected the request (HTTP {response.status_code}: "
                                    f"{_message(response)})")
                else:
                    try:
                        return response.json()
                    except ValueError:
                        raise FedPTError(f"the large LM at {url} answered with something that is not JSON") from None
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        # An outage, not bad input: a round that meets it fails resumably (fedpt.errors.ServiceError).
        raise ServiceError(f"{last} [after {self.retries + 1} attempts]")


class _Rejected(Exception):
    """A 4xx other than auth: maybe an unknown field; the caller decides whether to retry."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _message(response: Any) -> str:
    """The server's error message (OpenAI format ``{"error": {"message": ...}}`` or FastAPI ``detail``)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:300]
        if "detail" in data:
            return str(data["detail"])[:300]
    return str(data)[:300]


def openai_base_url(url: str) -> str:
    """The OpenAI base URL as clients take it (``.../v1``); a bare ``http://host:port`` gets ``/v1``."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def openai_logit_source(cfg: Any, small_base: Any) -> Callable[[], OpenAITopKSource]:
    """``model.large_backend = "openai"``: connect, check the vocabulary, and return a factory of
    sources (one per decoding session) for ``fedpt.server.large_logit_source``."""
    from fedpt.models.loading import PROBE_STRINGS, load_tokenizer

    width = small_base.get_output_embeddings().weight.shape[0]
    source = OpenAITopKSource.from_config(cfg.model, load_tokenizer(cfg.model.small), width)
    source.check_vocabulary(PROBE_STRINGS)
    return source.fork


def check_openai_vocabulary(cfg: Any) -> None:
    """Preflight for ``large_backend = "openai"``: reachable, key accepted, same tokenization."""
    from fedpt.models.loading import PROBE_STRINGS, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.small)
    source = OpenAITopKSource.from_config(cfg.model, tokenizer, len(tokenizer))
    try:
        source.check_vocabulary(PROBE_STRINGS)
    finally:
        source.client.close()
