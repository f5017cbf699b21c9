"""``fedpt serve``'s prefix cache: a client that resends a growing sequence (the top-k backend
asks one token at a time) gets the logits of a full prefill while the server runs only the
new tokens."""

from __future__ import annotations

import torch

from fedpt.models.logits import LocalLogitSource, PrefixCache


def test_a_growing_prompt_runs_only_its_new_tokens_with_the_same_logits(tiny_pair):
    tokenizer, _, large = tiny_pair
    sequence = tokenizer("The quick brown fox jumps over the lazy dog by the sea", return_tensors="pt")["input_ids"][0]
    cache = PrefixCache(capacity=4)
    ran: list[int] = []  # tokens each cached forward actually processed
    hook = large.register_forward_pre_hook(lambda module, args, kwargs: ran.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        for n in range(3, len(sequence) + 1):
            ids = sequence[None, :n]
            mask = torch.ones_like(ids)
            got = LocalLogitSource(large, prefix_cache=cache).prefill(ids, mask)
            ran.append(-1)  # marks the end of the cached call
            want = LocalLogitSource(large).prefill(ids, mask)  # independent: a full prefill, no cache
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    finally:
        hook.remove()
    cached_calls = [ran[i - 1] for i, value in enumerate(ran) if value == -1]
    assert cached_calls == [3] + [1] * (len(sequence) - 3)
    assert len(cache.entries) == 1  # each extension replaced the entry it extended

    # The same prompt again runs no forward; a session decodes on from a cached prefill exactly
    # as from a full one (the stored cache is a copy: the first session's steps do not leak).
    ids, mask = sequence[None], torch.ones(1, len(sequence), dtype=torch.long)
    calls = []
    hook = large.register_forward_pre_hook(lambda *a: calls.append(1))
    cached = LocalLogitSource(large, prefix_cache=cache)
    cached.prefill(ids, mask)
    hook.remove()
    assert not calls
    reference = LocalLogitSource(large)
    reference.prefill(ids, mask)
    for token in (5, 6, 7):
        step = torch.tensor([token])
        torch.testing.assert_close(cached.step(step), reference.step(step), atol=1e-5, rtol=0)
    # A session that extended the cache (a stored entry) decodes on; the entry must not change.
    longer = torch.cat([sequence, torch.tensor([9])])[None]
    extended = LocalLogitSource(large, prefix_cache=cache)
    extended.prefill(longer, torch.ones_like(longer))
    for token in (5, 6, 7):
        extended.step(torch.tensor([token]))
    again = LocalLogitSource(large, prefix_cache=cache)
    torch.testing.assert_close(again.prefill(longer, torch.ones_like(longer)),
                               LocalLogitSource(large).prefill(longer, torch.ones_like(longer)), atol=1e-5, rtol=0)
    fresh = LocalLogitSource(large)
    fresh.prefill(longer, torch.ones_like(longer))
    torch.testing.assert_close(again.step(torch.tensor([3])), fresh.step(torch.tensor([3])), atol=1e-5, rtol=0)


def test_capacity_evicts_the_least_recently_used(tiny_pair):
    _, _, large = tiny_pair
    cache = PrefixCache(capacity=2)
    for first in (10, 20, 30):
        ids = torch.tensor([[first, 11, 12]])
        LocalLogitSource(large, prefix_cache=cache).prefill(ids, torch.ones_like(ids))
    assert list(cache.entries) == [(20, 11, 12), (30, 11, 12)]
    # batches of several rows and padded rows take the ordinary path, untouched by the cache
    ids = torch.tensor([[10, 11, 12], [0, 20, 11]])
    LocalLogitSource(large, prefix_cache=cache).prefill(ids, torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert list(cache.entries) == [(20, 11, 12), (30, 11, 12)]
