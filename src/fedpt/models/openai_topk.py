"""The large LM behind any OpenAI-compatible completions endpoint that returns top-k log-probabilities.

Commercial APIs, vLLM, llama.cpp's server and ``fedpt serve`` expose at most the top-k
log-probabilities of the next token through ``/v1/completions`` (``max_tokens=1, logprobs=k``).
``OpenAITopKSource`` is a ``LogitSource`` built on exactly that call and nothing more:

- ``prefill``/``step``: one request per decoding step, the whole (unpadded) sequence of every
  row resent as a token-id prompt (or its text, to servers that take only text). The API is
  stateless (no KV cache of ours on the server), so generating N tokens after a P-token prompt
  sends N·P + N²/2 prompt tokens: without the server's own prefix caching (vLLM, ``fedpt serve``
  and llama-cpp-python's server reuse the longest cached prefix) each step costs a prefill of
  the whole sequence.
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

Servers that speak only text. llama-cpp-python's server (``python -m llama_cpp.server``) takes
one text prompt per request (token ids or a list of prompts: HTTP 500), and its echo holds the
prompt's tokens only, each with the distribution *after* it. The backend learns this once
(``ServerTraits``, ``_learn``): it sends the ids decoded to text, one row per request, checks that
the server's tokens of the text are ours (at start-up through the echo, one line naming the first
differing token; in decoding through ``usage.prompt_tokens``; in scoring through the echo) and
reads the echo in whichever layout the server uses.
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
        self.bytes_of: dict[int, bytes] = {}
        self.special_ids: set[int] = set()
        self.ambiguous = 0
        for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token not in special and all(char in byte_of for char in token):
                raw = bytes(byte_of[char] for char in token)
            else:
                raw = token.encode("utf-8")
                self.special_ids.add(token_id)
            self.bytes_of[token_id] = raw
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

    def spells(self, text: str, token_id: int) -> bool:
        """Whether a server's echoed token string can be our token ``token_id``: exactly, or as
        servers print what has no exact spelling: a special token as its text or as ``""``
        (llama-cpp-python), partial UTF-8 with U+FFFD for the broken bytes (``errors="replace"``)
        or without them (``errors="ignore"``, llama-cpp-python)."""
        if self.to_id(text) == token_id:
            return True
        raw = self.bytes_of.get(token_id)
        if raw is None:
            return False
        if token_id in self.special_ids:
            return text in ("", raw.decode("utf-8", "replace"))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return text in (raw.decode("utf-8", "replace"), raw.decode("utf-8", "ignore"))
        return False

    def show(self, token_id: int) -> str:
        """``'text' (id N)`` of one of our tokens, for messages."""
        raw = self.bytes_of.get(token_id, b"")
        return f"{raw.decode('utf-8', 'replace')!r} (id {token_id})"


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
    retokenized: int = 0  # text prompts the server split into other tokens than ours (text-only servers)
    refetched: int = 0  # scored positions the echo did not hold, asked for with a prompt of their own


@dataclass
class ServerTraits:
    """How a server answers, learned from its first answers once per backend (forks share it).

    Servers differ where the OpenAI API leaves room: llama-cpp-python's server takes one text
    prompt per request (a token-id prompt or a list of prompts gets HTTP 500), and its echo holds
    the prompt's tokens only, each with the distribution *after* it; vLLM and ``fedpt serve`` take
    batches of token ids and echo OpenAI's way (entry j: the distribution of token j, then the
    generated token).
    """

    token_ids: bool | None = None  # honours return_tokens_as_token_ids (None: unknown until an answer)
    id_prompts: bool | None = None  # takes token-id prompts; False: we send text (the ids decoded)
    batch: bool | None = None  # takes several prompts per request; False: one request per row
    echo_generated: bool | None = None  # the echo's tokens end with the generated token
    echo_offset: int | None = None  # the distribution after prompt token t is top_logprobs[t + echo_offset]
    echo_error: str = ""  # why echo cannot be used (distillation and the vocabulary check need it)
    usage_offset: int | None = None  # usage.prompt_tokens minus our token count (a BOS the server adds)


_TEXT_ONLY_NOTED: set[str] = set()  # servers already said to take text only, in this process
CALIBRATION_PROBE = "Below is an instruction that describes a task."  # ASCII: decoding our ids gives it back
CALIBRATION_TOP = 5  # log-probs asked for while learning the echo's layout (OpenAI allows 5)


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
    id_prompts:
        Send token-id prompts (``None``: if the server takes them, else text; ``False``: always text).
    """

    remote = True  # computes elsewhere: the proxy runs the small LM while it waits (``ProxyTunedLM``)

    def __init__(self, base_url: str, model: str, k: int, tokenizer: Any, vocab_size: int,
                 api_key: str | None = None, timeout: float = 300.0, retries: int = 3,
                 token_ids: bool | None = None, id_prompts: bool | None = None) -> None:
        import httpx

        if k < 1:
            raise FedPTError(f"model.large_topk must be >= 1, got {k}")
        self.base_url = base_url.rstrip("/")
        # More than the vocabulary is the whole distribution (and some servers fail on it).
        self.k, self.tokenizer, self.vocab_size, self.retries = min(k, vocab_size), tokenizer, vocab_size, retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.mapper = TokenMapper(tokenizer)
        self.traits = ServerTraits(token_ids=token_ids, id_prompts=id_prompts)
        self.stats = TopKStats()
        self._rows: list[list[int]] = []
        self.model = model or self._only_model()

    @property
    def token_ids_extension(self) -> bool | None:
        """Whether the server returns ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``)."""
        return self.traits.token_ids

    @classmethod
    def from_config(cls, model_cfg: Any, tokenizer: Any, vocab_size: int) -> "OpenAITopKSource":
        """Build from ``[model]``: ``large_url``, ``large_api_key_file``, ``large_model_name``, ``large_topk``."""
        from fedpt.models.remote import read_api_key

        return cls(openai_base_url(model_cfg.large_url), model_cfg.large_model_name, model_cfg.large_topk, tokenizer,
                   vocab_size, api_key=read_api_key(model_cfg.large_api_key_file))

    def fork(self) -> "OpenAITopKSource":
        """A source for another decoding session on the same connection (the API is stateless:
        a session is just the sequences we resend); statistics and server traits are shared."""
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
        """(B, K, V) top-k logits at the last K positions of left-padded sequences (``echo=True``).

        Position t (the distribution after token t) comes from the echo where the server's tokens
        up to t are ours; a position the echo does not hold (llama-cpp-python's echo has none after
        the first token, a text-only server may split the text differently) is asked for with a
        prompt of its own (``stats.refetched``).
        """
        self._learn()
        if self.traits.echo_error:
            raise FedPTError(self.traits.echo_error)
        rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        width = input_ids.shape[1]
        keep = keep_last or width
        out = torch.full((len(rows), keep, self.vocab_size), -math.inf)
        missing: list[tuple[int, int]] = []  # (row, position t)
        for i, (row, choice) in enumerate(zip(rows, self._ask(rows, echo=True))):
            tops = choice["logprobs"]["top_logprobs"]
            agree = self._agreeing(self._echoed_prompt(choice), row)
            if agree < len(row):
                self._retokenized(row, self._echoed_prompt(choice))
            # Left padding: real position t of a length-L row sits in column width - L + t, so
            # in the last `keep` columns at t - (L - keep).
            for t in range(max(0, len(row) - keep), len(row)):
                j = t + self.traits.echo_offset
                top = tops[j] if t < agree and j < len(tops) else None
                if top:
                    out[i, t - len(row) + keep] = topk_to_logits([self._parse_top(top)], self.vocab_size)[0]
                else:
                    missing.append((i, t))
        if missing:
            self.stats.refetched += len(missing)
            prefixes = [rows[i][: t + 1] for i, t in missing]
            choices = self._ask(prefixes, echo=False)
            for (i, t), choice in zip(missing, choices):
                top = self._parse_top(choice["logprobs"]["top_logprobs"][0])
                out[i, t - len(rows[i]) + keep] = topk_to_logits([top], self.vocab_size)[0]
        return out

    def close(self) -> None:
        self._rows = []

    # -- checks ---------------------------------------------------------------------------

    def check_vocabulary(self, probes: tuple[str, ...]) -> None:
        """Send probe texts with ``echo=True``: the server must tokenize them as our tokenizer does."""
        self._learn()
        if self.traits.echo_error:
            raise FedPTError(self.traits.echo_error)
        for probe in probes:
            choice = self._complete([probe], echo=True, top=1)[0]
            self._check_same_tokens(probe, self._echoed_prompt(choice))

    def _check_same_tokens(self, text: str, theirs: list[str]) -> None:
        """One line naming the first position where the server's tokens of ``text`` differ from ours."""
        candidates = [self.tokenizer(text)["input_ids"], self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        if any(self._agreeing(theirs, ours) == len(ours) == len(theirs) for ours in candidates):
            return
        ours = max(candidates, key=lambda ids: self._agreeing(theirs, ids))
        raise FedPTError(f"the large LM at {self.base_url} ('{self.model}') tokenizes {text[:30]!r} differently "
                         f"from the small model's tokenizer: {self._difference(ours, theirs)}; proxy-tuning needs "
                         "the large LM to use the small model's vocabulary")

    def _agreeing(self, theirs: list[str] | list[int], ours: list[int]) -> int:
        """How many leading positions of the server's tokens (strings as echoed, or ids) are ours."""
        n = 0
        for their, token_id in zip(theirs, ours):
            if not (their == token_id if isinstance(their, int) else self.mapper.spells(their, token_id)):
                break
            n += 1
        return n

    def _difference(self, ours: list[int], theirs: list[str] | list[int]) -> str:
        """``token 3 of 9 (ours) / 8 (theirs): ours 'ab' (id 7), theirs 'a' (id 5)``: the first difference."""
        t = self._agreeing(theirs, ours)
        mine = self.mapper.show(ours[t]) if t < len(ours) else "nothing (ours ends there)"
        if t >= len(theirs):
            other = "nothing (theirs ends there)"
        elif isinstance(theirs[t], int):
            other = self.mapper.show(theirs[t])
        else:
            their_id = self.mapper.to_id(theirs[t])
            if their_id is not None and theirs[t].startswith(TOKEN_ID_PREFIX):
                other = self.mapper.show(their_id)
            else:
                other = f"{theirs[t]!r}" + (f" (id {their_id})" if their_id is not None else "")
        return f"token {t} of {len(ours)} (ours) / {len(theirs)} (theirs): ours {mine}, theirs {other}"

    def _retokenized(self, ours: list[int], theirs: list[str] | list[int]) -> None:
        """A text prompt the server split differently: counted, and said once in one line."""
        self.stats.retokenized += 1
        if self.stats.retokenized == 1:
            print(f"warning: the large LM at {self.base_url} split the text of a sequence into other tokens than "
                  f"ours ({self._difference(ours, theirs)}); its next-token distribution there is for its split "
                  "of the same text (counted in stats.retokenized)", file=sys.stderr)

    # -- learning how the server answers ---------------------------------------------------

    def _learn(self) -> None:
        """Once per backend: which prompts the server takes, and how its echo is laid out.

        1. A token-id prompt (the probe's ids); if the server refuses it, the same prompt as text
           (llama-cpp-python's server takes text only), and text from then on.
        2. The same prompt with ``echo=True``: are the server's tokens ours (one line naming the
           first difference if not), does the echo end with the generated token, and which echo
           entry holds the distribution after the whole prompt (the one the plain request gave)?
        """
        if self.traits.echo_offset is not None or self.traits.echo_error:
            return
        ids = self.tokenizer(CALIBRATION_PROBE, add_special_tokens=False)["input_ids"]
        top = min(CALIBRATION_TOP, self.vocab_size)
        if self.traits.id_prompts is None:
            try:
                plain = self._complete([ids], echo=False, top=top, probing=True)[0]
                self.traits.id_prompts = True
            except _Rejected as refused:
                self.traits.id_prompts = False
                plain = self._complete([CALIBRATION_PROBE], echo=False, top=top)[0]
                if self.base_url not in _TEXT_ONLY_NOTED:  # once per server, not per backend (preflight, run)
                    _TEXT_ONLY_NOTED.add(self.base_url)
                    print(f"note: the large LM at {self.base_url} refuses token-id prompts ({refused.reason[:120]}); "
                          "sending text (our token ids decoded) and checking its tokens against ours", file=sys.stderr)
        else:
            plain = self._complete([self._prompt(ids)], echo=False, top=top)[0]
        after_prompt = plain["logprobs"]["top_logprobs"][0]
        try:
            reply = self._complete([self._prompt(ids)], echo=True, top=top, whole=True)
        except FedPTError as err:
            self.traits.echo_error = (f"the large LM at {self.base_url} cannot echo prompts with log-probabilities "
                                      f"({err}), which distillation and the vocabulary check need")
            return
        echo = reply["choices"][0]
        tokens, tops = echo["logprobs"].get("tokens") or [], echo["logprobs"]["top_logprobs"]
        n = len(ids)
        if len(tokens) <= 1 < n:  # the answer is the generated token's alone: echo ignored
            self.traits.echo_error = (f"the large LM at {self.base_url} returned {len(tokens)} echoed tokens for a "
                                      f"{n}-token prompt: it does not support echo=True with logprobs, which "
                                      "distillation and the vocabulary check need")
            return
        if self._agreeing(tokens, ids) == n and len(tokens) in (n, n + 1):
            generated = len(tokens) == n + 1
        else:  # their split differs: the echo's text tells whether the generated token is in it
            text = echo.get("text") or ""
            generated = "".join(tokens) == text and text != CALIBRATION_PROBE
        self._check_same_tokens(CALIBRATION_PROBE, tokens[:-1] if generated else tokens)
        if n < len(tops) and _same_distribution(tops[n], after_prompt):
            offset = 1  # OpenAI's layout: entry j is the distribution of token j
        elif n - 1 < len(tops) and _same_distribution(tops[n - 1], after_prompt):
            offset = 0  # llama-cpp-python: entry j is the distribution after token j (entry 0 lost)
        else:
            offset = 1  # OpenAI's layout without the last entry: asked for separately when needed
        self.traits.echo_generated, self.traits.echo_offset = generated, offset
        prompt_tokens = (reply.get("usage") or {}).get("prompt_tokens")
        self.traits.usage_offset = prompt_tokens - n if isinstance(prompt_tokens, int) else None

    def _echoed_prompt(self, choice: dict[str, Any]) -> list[str]:
        """The server's tokens of the prompt in an echo (without the generated token, if it is there)."""
        tokens = choice["logprobs"].get("tokens") or []
        return tokens[:-1] if self.traits.echo_generated and tokens else tokens

    # -- HTTP -----------------------------------------------------------------------------

    def _next_token_logits(self) -> torch.Tensor:
        self._learn()
        choices = self._ask(self._rows, echo=False)
        return topk_to_logits([self._parse_top(choice["logprobs"]["top_logprobs"][0]) for choice in choices],
                              self.vocab_size)

    def _prompt(self, ids: list[int]) -> list[int] | str:
        """A row as the server takes it: token ids, or their text."""
        if self.traits.id_prompts is not False:
            return ids
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _ask(self, rows: list[list[int]], echo: bool) -> list[dict[str, Any]]:
        """Choices for rows of token ids, in row order: in batches if the server takes them, else one
        request per row; text prompts in decoding are checked against our tokens (``_check_split``)."""
        replies = None
        if len(rows) > 1 and self.traits.batch is not False:
            try:
                replies = [(rows, self._complete([self._prompt(row) for row in rows], echo,
                                                 probing=self.traits.batch is None, whole=True))]
                self.traits.batch = True
            except _Rejected:  # llama-cpp-python's server: one prompt per request
                self.traits.batch = False
        if replies is None:
            replies = [([row], self._complete([self._prompt(row)], echo, whole=True)) for row in rows]
        choices = []
        for sent, reply in replies:
            choices += reply["choices"]
            if self.traits.id_prompts is False:
                self.stats.prompt_tokens += sum(len(row) for row in sent)
                if not echo:
                    self._check_split(sent, reply)
        return choices

    def _split(self, row: list[int]) -> list[int]:
        """Our tokenizer's split of a row's text: what a server that tokenizes as we do works on."""
        return self.tokenizer(self._prompt(row), add_special_tokens=False)["input_ids"]

    def _check_split(self, rows: list[list[int]], reply: dict[str, Any]) -> None:
        """Text prompts in decoding: which split of each row's text the server's answer is for.

        The start-up check showed that the server tokenizes text as our tokenizer does, so its split
        of a row's text is ours (``_split``): a row that decoding built in a split BPE would not make
        (the proxy picked 'et', then 's'; the text says 'ets') is named and counted. The prompt token
        count the server reports (``usage.prompt_tokens``) must match that split; where it does not,
        the server tokenizes this text otherwise than we do, and an echo of each row names where.
        (Not an echo every step: llama-cpp-python sorts the whole vocabulary at every echoed position.)
        """
        splits = [self._split(row) for row in rows]
        for row, split in zip(rows, splits):
            if split != row:
                self._retokenized(row, split)
        counted = (reply.get("usage") or {}).get("prompt_tokens")
        if (not isinstance(counted, int) or self.traits.usage_offset is None
                or counted == sum(len(split) + self.traits.usage_offset for split in splits)):
            return
        for row, split in zip(rows, splits):
            theirs = self._echoed_prompt(self._complete([self._prompt(row)], echo=True, top=1)[0])
            if self._agreeing(theirs, split) < max(len(split), len(theirs)) and split == row:
                self._retokenized(row, theirs)

    def _complete(self, prompts: list, echo: bool, top: int | None = None, probing: bool = False,
                  whole: bool = False) -> Any:
        """One completions request for a batch of prompts; its choices in prompt order (the whole
        reply with ``whole``). ``probing``: a refusal (any 4xx/5xx) raises ``_Rejected`` at once,
        unretried, for the caller to try another form."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompts[0] if len(prompts) == 1 and
                                isinstance(prompts[0], str) else prompts, "max_tokens": 1, "temperature": 0.0,
                                "logprobs": top or self.k, "echo": echo}
        if self.traits.token_ids is not False:
            body["return_tokens_as_token_ids"] = True
        try:
            reply = self._post("/completions", body, probing)
        except _Rejected as err:
            if "return_tokens_as_token_ids" not in body:
                if probing:
                    raise
                raise FedPTError(err.message) from None
            # A strict server (OpenAI's own) refuses unknown fields: go on with byte-level mapping.
            del body["return_tokens_as_token_ids"]
            try:
                reply = self._post("/completions", body, probing)
            except _Rejected as again:
                if probing:
                    raise
                raise FedPTError(again.message) from None
            self.traits.token_ids = False
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts) or any(not (c.get("logprobs") or {}).get("top_logprobs") for c in choices):
            message = (f"the large LM at {self.base_url} answered without top-k log-probabilities "
                       f"({len(choices)} choices for {len(prompts)} prompts): it must support logprobs")
            if probing and len(prompts) > 1:
                raise _Rejected(message)
            raise FedPTError(message)
        self.stats.requests += 1
        self.stats.prompt_tokens += sum(len(p) for p in prompts if isinstance(p, list))
        reply["choices"] = choices
        return reply if whole else choices

    def _parse_top(self, top: dict[str, float] | None) -> dict[int, float]:
        """One position's ``{token string: logprob}`` -> ``{id: logprob}``, the k largest."""
        top = top or {}
        self.stats.positions += 1
        self.stats.returned += len(top)
        self.stats.collapsed += max(0, self.k - len(top))
        if self.traits.token_ids is None and top:
            self.traits.token_ids = next(iter(top)).startswith(TOKEN_ID_PREFIX)
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

    def _post(self, path: str, body: dict[str, Any], probing: bool = False) -> dict[str, Any]:
        return self._request("POST", path, body, probing)

    def _request(self, method: str, path: str, body: dict[str, Any] | None, probing: bool = False) -> dict[str, Any]:
        """Bounded retries on connection errors, 429 and 5xx; one clear line for everything else.
        ``probing``: 429/5xx are a refusal of this request's form (``_Rejected``), not retried."""
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
                if (response.status_code == 429 or response.status_code >= 500) and not probing:
                    last = f"the large LM at {url} failed (HTTP {response.status_code}: {_message(response)})"
                elif response.status_code >= 400:
                    raise _Rejected(f"the large LM at {url} rejected the request (HTTP {response.status_code}: "
                                    f"{_message(response)})", f"HTTP {response.status_code}: {_message(response)}")
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

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.message, self.reason = message, reason or message


def _message(response: Any) -> str:
    """The server's error message (OpenAI format ``{"error": {"message": ...}}`` or FastAPI ``detail``),
    on one line."""
    try:
        data = response.json()
    except ValueError:
        return " ".join(response.text[:200].split()) or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return " ".join(str(error["message"]).split())[:300]
        if "detail" in data:
            return " ".join(str(data["detail"]).split())[:300]
    return " ".join(str(data).split())[:300] or response.reason_phrase


def _same_distribution(a: dict[str, float] | None, b: dict[str, float] | None, atol: float = 0.05) -> bool:
    """Whether two answers' top log-probabilities are the same position's: the 3 most likely
    strings of each are among the other's, at log-probabilities within ``atol``. Two positions of
    a sequence differ by far more; the same one computed twice (a prompt's last position in an
    echo and in a plain request) differs by rounding."""
    if not a or not b:
        return False
    for x, y in ((a, b), (b, a)):
        for text, logprob in sorted(x.items(), key=lambda item: -item[1])[:3]:
            if text not in y or abs(y[text] - logprob) > atol:
                return False
    return True


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
