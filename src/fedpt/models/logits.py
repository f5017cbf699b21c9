"""Next-token logits behind one small interface, so a black-box large LM can sit behind it.

FedPT only ever asks a model "next-token logits for these sequences". ``LogitSource`` is that
question in two forms: incremental (``prefill`` then ``step``, one decoding session, one KV
cache) for generation, and whole-sequence (``score``) for distillation. A remote backend can
implement it by resending sequences; ``LocalLogitSource`` wraps a Hugging Face model.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitSource(Protocol):
    """Next-token logits for a batch of left-padded sequences."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Start a decoding session on (B, T) prompts; return fp32 logits (B, V) for the next token."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) to the session; return fp32 logits (B, V) for the next one."""
        ...

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        """fp32 logits (B, T, V) at every position of whole sequences (no session); with
        ``keep_last=K`` only the last K positions (B, K, V): on left-padded batches that is where
        the responses are, and it spares the (B, T, V) tensor a 150k-token vocabulary makes."""
        ...


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, as HF generate() does: left padding safe."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class PrefixCache:
    """KV caches of recent single-sequence prompts, shared by the sources of one served model.

    A client of a stateless completions API (the top-k backend asks ``max_tokens=1`` each step)
    resends its whole, one-token-longer sequence every request; without this, every request
    prefills it again. As vLLM's automatic prefix caching and llama.cpp's ``cache_prompt`` do, a
    prompt that extends a cached one runs only its new tokens. Entries are copied in and out
    (a session extends its cache in place) and an extension replaces the entry it extends, so
    one client holds one entry; at most ``capacity`` entries, least recently used first out.
    """

    def __init__(self, capacity: int = 16) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self.entries: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor]] = OrderedDict()
        self.hits = self.reused_tokens = 0

    def longest(self, ids: tuple[int, ...]) -> tuple[int, Any, torch.Tensor] | None:
        """(length, cache copy, logits) of the longest cached prefix of ``ids``, or None."""
        import copy

        best = max((key for key in self.entries if len(key) <= len(ids) and ids[: len(key)] == key),
                   key=len, default=None)
        if best is None:
            return None
        self.entries.move_to_end(best)
        cache, logits = self.entries[best]
        self.hits += 1
        self.reused_tokens += len(best)
        return len(best), copy.deepcopy(cache), logits

    def put(self, ids: tuple[int, ...], cache: Any, logits: torch.Tensor) -> None:
        import copy

        for key in [k for k in self.entries if len(k) < len(ids) and ids[: len(k)] == k]:
            del self.entries[key]  # superseded by its extension
        self.entries[ids] = (copy.deepcopy(cache), logits)
        self.entries.move_to_end(ids)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class LocalLogitSource:
    """A local causal LM. For a PeftModel, ``use_adapter=False`` reads the frozen base model.

    Each instance keeps its own KV cache, so the tuned and base views of one PeftModel can
    decode side by side. With a ``prefix_cache`` (``fedpt serve``), single-sequence prefills
    reuse the KV cache of the longest earlier prompt they extend.
    """

    def __init__(self, model: Any, use_adapter: bool = True, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model
        self.use_adapter = use_adapter
        self.prefix_cache = prefix_cache
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None

    def _view(self):
        if not self.use_adapter and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return nullcontext()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: Any) -> torch.Tensor:
        self.model.eval()
        if self.prefix_cache is not None and len(input_ids) == 1 and bool(attention_mask.all()) and not extra:
            return self._prefill_cached(input_ids[0])
        positions = positions_from_mask(attention_mask)
        with self._view():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **extra)
        self._cache = out.cache
        self._mask = attention_mask
        self._next_pos = positions[:, -1] + 1
        return out.logits[:, -1].float()

    def _prefill_cached(self, ids: torch.Tensor) -> torch.Tensor:
        key = tuple(ids.tolist())
        hit = self.prefix_cache.longest(key)
        if hit is not None and hit[0] == len(key):  # the very same prompt again
            _, cache, logits = hit
        else:
            start, cache = (hit[0], hit[1]) if hit is not None else (0, None)
            with self._view():
                out = self.model(input_ids=ids[None, start:], attention_mask=torch.ones(1, len(key), dtype=torch.long),
                                 position_ids=torch.arange(start, len(key))[None], cache=cache, use_cache=True,
                                 logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1].float()
            self.prefix_cache.put(key, cache, logits)
        self._cache = cache
        self._mask = torch.ones(1, len(key), dtype=torch.long)
        self._next_pos = torch.tensor([len(key)])
        return logits.clone()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, **extra: Any) -> torch.Tensor:
        assert self._mask is not None and self._next_pos is not None, "step() before prefill()"
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(tokens), 1))], dim=1)
        with self._view():
            out = self.model(input_ids=tokens[:, None], attention_mask=self._mask,
                             position_ids=self._next_pos[:, None], cache=self._cache, use_cache=True, **extra)
        self._cache = out.cache
        self._next_pos = self._next_pos + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0,
              **extra: Any) -> torch.Tensor:
        self.model.eval()
        with self._view():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions_from_mask(attention_mask), use_cache=False,
                             logits_to_keep=keep_last, **extra)
        return out.logits.float()

    def close(self) -> None:
        """Drop the session's KV cache (it can hold hundreds of MB on real models)."""
        self._cache = self._mask = self._next_pos = None


class MixedAdapterDiff:
    """``z_tuned - z_base`` of one PeftModel from a single forward over a doubled batch.

    Rows ``[0, B)`` run with the adapter, rows ``[B, 2B)`` without it (peft's mixed-adapter
    batches, ``adapter_names=[...,"__base__"]``): one model call and one KV cache per token
    instead of two, which is most of the proxy's overhead on a CPU. Batch-shape rounding can
    differ from two separate calls in the last bits (bf16): compare with a tolerance.
    """

    BASE = "__base__"

    def __init__(self, peft_model: Any, adapter: str = "default") -> None:
        self.inner = LocalLogitSource(peft_model)
        self.adapter = adapter
        self._rows = 0

    def _names(self, rows: int) -> list[str]:
        return [self.adapter] * rows + [self.BASE] * rows

    def _split(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[: self._rows] - logits[self._rows:]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._rows = len(input_ids)
        return self._split(self.inner.prefill(torch.cat([input_ids, input_ids]), torch.cat([attention_mask] * 2),
                                              adapter_names=self._names(self._rows)))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._split(self.inner.step(torch.cat([tokens, tokens]), adapter_names=self._names(self._rows)))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_last: int = 0) -> torch.Tensor:
        self._rows = len(input_ids)
        return self._split(self.inner.score(torch.cat([input_ids, input_ids]), torch.cat([attention_mask] * 2),
                                            keep_last, adapter_names=self._names(self._rows)))

    def close(self) -> None:
        self.inner.close()
