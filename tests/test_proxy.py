import copy

import torch

from fedpt.data.prompts import encode_prompts_left
from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
from fedpt.models.lora import attach_lora
from fedpt.proxy import (Decoding, ProxyTunedLM, TwoSourceDiff, decode, generate_ids, proxy_logits,
                         stop_token_ids)

PROMPTS = ["### Instruction:\nName a fruit.\n\n### Response:\n", "Tell me about the sun and the moon, please."]


class FixedLogits:
    """A LogitSource that always returns the same (B, V) logits: for hand computations."""

    def __init__(self, logits):
        self.logits = logits

    def prefill(self, input_ids, attention_mask):
        return self.logits

    def step(self, tokens):
        return self.logits

    def score(self, input_ids, attention_mask, keep_last=0):
        return self.logits[:, None, :].expand(-1, keep_last or input_ids.shape[1], -1)


def test_proxy_logits_match_hand_computation():
    z_large = torch.tensor([[1.0, 2.0, 3.0]])
    z_tuned = torch.tensor([[0.5, 0.0, 4.0]])
    z_base = torch.tensor([[0.5, 1.0, 1.0]])
    expected = torch.tensor([[1.0, 2.0 - 1.5, 3.0 + 4.5]])  # z_L + 1.5 * (z_t - z_b)
    assert torch.equal(proxy_logits(z_large, z_tuned - z_base, 1.5), expected)
    proxy = ProxyTunedLM(FixedLogits(z_large), TwoSourceDiff(FixedLogits(z_tuned), FixedLogits(z_base)), alpha=1.5)
    assert torch.equal(proxy.prefill(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)), expected)
    assert torch.equal(proxy.score(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))[0, 3], expected[0])
    # Greedy decoding follows the shifted argmax (token 2), not the large model's own (token 2 too)
    # nor the small model's difference alone: check with alpha that flips it.
    flip = ProxyTunedLM(FixedLogits(z_large), TwoSourceDiff(FixedLogits(torch.tensor([[9.0, 0.0, 0.0]])),
                                                            FixedLogits(torch.zeros(1, 3))), alpha=1.0)
    out = decode(flip, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), [1], 1,
                 Decoding(max_new_tokens=3))
    assert out == [[0, 0, 0]]


def test_alpha_zero_is_exactly_the_large_model(tiny_pair, tiny_cfg):
    tokenizer, small, large = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():  # a non-trivial adapter, so tuned != base
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    large_src = LocalLogitSource(large)
    proxy0 = ProxyTunedLM(large_src, MixedAdapterDiff(peft), alpha=0.0)
    proxy1 = ProxyTunedLM(large_src, MixedAdapterDiff(peft), alpha=1.0)
    cfg = Decoding(max_new_tokens=12)
    ours = generate_ids(proxy0, tokenizer, PROMPTS, cfg, batch_size=2, max_prompt_tokens=64)
    assert ours == generate_ids(large_src, tokenizer, PROMPTS, cfg, batch_size=2, max_prompt_tokens=64)
    assert generate_ids(proxy1, tokenizer, PROMPTS, cfg, 2, 64) != ours  # the adapter does steer
    # ... and equal to Hugging Face's own greedy generate(), prompt by prompt.
    for prompt, row in zip(PROMPTS, ours):
        ids, mask = encode_prompts_left(tokenizer, [prompt], 64)
        hf = large.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        hf_new = hf[0, ids.shape[1]:].tolist()
        stops = set(stop_token_ids(tokenizer))
        cut = next((i for i, t in enumerate(hf_new) if t in stops), len(hf_new))
        assert row == hf_new[:cut]


def test_left_padded_batch_matches_single_prompts(tiny_pair):
    tokenizer, _, large = tiny_pair
    source = LocalLogitSource(large)
    cfg = Decoding(max_new_tokens=10)
    batched = generate_ids(source, tokenizer, PROMPTS, cfg, batch_size=2, max_prompt_tokens=64)
    single = [generate_ids(source, tokenizer, [p], cfg, 1, 64)[0] for p in PROMPTS]
    assert batched == single


def test_sampling_is_seeded_and_respects_no_repeat_ngrams(tiny_pair):
    tokenizer, _, large = tiny_pair
    source = LocalLogitSource(large)
    cfg = Decoding(max_new_tokens=20, do_sample=True, top_p=0.9, top_k=50, no_repeat_ngram_size=2, seed=7)
    a = generate_ids(source, tokenizer, PROMPTS, cfg, 2, 64)
    assert a == generate_ids(source, tokenizer, PROMPTS, cfg, 2, 64)
    for row in a:
        bigrams = list(zip(row, row[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_mixed_adapter_batch_matches_two_separate_models(tiny_pair, tiny_cfg):
    tokenizer, small, _ = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    mixed = MixedAdapterDiff(peft)
    plain = TwoSourceDiff(LocalLogitSource(peft, True), LocalLogitSource(peft, False))
    torch.testing.assert_close(mixed.prefill(ids, mask), plain.prefill(ids, mask), rtol=1e-4, atol=1e-4)
    tokens = torch.tensor([5, 9])
    torch.testing.assert_close(mixed.step(tokens), plain.step(tokens), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed.score(ids, mask), plain.score(ids, mask), rtol=1e-4, atol=1e-4)
    assert mixed.prefill(ids, mask).abs().max() > 0.1  # a real difference, not zeros on both sides


def test_score_keep_last_is_the_tail_of_full_scoring(tiny_pair, tiny_cfg):
    tokenizer, small, large = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    proxy = ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(peft), alpha=1.0)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    full = proxy.score(ids, mask)
    torch.testing.assert_close(proxy.score(ids, mask, keep_last=5), full[:, -5:], rtol=1e-5, atol=1e-5)
    # the incremental path agrees with whole-sequence scoring at the last position
    torch.testing.assert_close(proxy.prefill(ids, mask), full[:, -1], rtol=1e-4, atol=1e-4)


def test_proxy_with_a_trained_looking_adapter_matches_plain_forwards(tiny_pair, tiny_cfg):
    """A LoRA with B != 0, alpha = 1.5: ProxyTunedLM (both diffs) and decode() against
    z_large + alpha * (z_tuned - z_base) computed from three separate plain models: the large
    LM, a copy of the small base, and the adapter merged into a copy of the small base."""
    tokenizer, small, large = tiny_pair
    alpha = 1.5
    base = copy.deepcopy(small)
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    tuned = copy.deepcopy(peft).merge_and_unload()  # W + scale * B A, as a plain model

    def expected_logits(ids):  # (1, T) unpadded -> (T, V)
        with torch.no_grad():
            z = [m(input_ids=ids).logits[0].float() for m in (large, tuned, base)]
        return z[0] + alpha * (z[1] - z[2])

    prompt = PROMPTS[0]
    ids, mask = encode_prompts_left(tokenizer, [prompt], 64)
    want = expected_logits(ids)
    shift = (want - large(input_ids=ids).logits[0].detach()).abs().max()
    assert shift > 1.0  # the adapter moves the logits a lot: a wrong sign or alpha cannot hide
    for diff in (MixedAdapterDiff(peft), TwoSourceDiff(LocalLogitSource(peft, True), LocalLogitSource(peft, False))):
        proxy = ProxyTunedLM(LocalLogitSource(large), diff, alpha=alpha)
        torch.testing.assert_close(proxy.prefill(ids, mask)[0], want[-1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(proxy.score(ids, mask)[0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(proxy.step(torch.tensor([7]))[0],
                                   expected_logits(torch.cat([ids, torch.tensor([[7]])], 1))[-1], rtol=1e-4, atol=1e-4)

    # Greedy decoding, re-running all three models on the whole sequence at every step (no KV cache).
    stops = set(stop_token_ids(tokenizer))
    sequence, expected = ids, []
    for _ in range(12):
        token = int(expected_logits(sequence)[-1].argmax())
        if token in stops:
            break
        expected.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    cfg = Decoding(max_new_tokens=12)
    for diff in (MixedAdapterDiff(peft), TwoSourceDiff(LocalLogitSource(peft, True), LocalLogitSource(peft, False))):
        proxy = ProxyTunedLM(LocalLogitSource(large), diff, alpha=alpha)
        assert generate_ids(proxy, tokenizer, [prompt], cfg, 1, 64) == [expected]
    assert expected != generate_ids(LocalLogitSource(large), tokenizer, [prompt], cfg, 1, 64)[0]  # steered
    # ... and the batched, left-padded path agrees for every prompt.
    batched = generate_ids(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(peft), alpha), tokenizer, PROMPTS,
                           cfg, 2, 64)
    assert batched[0] == expected


class Scripted:
    """A LogitSource that picks ``script[step][row]`` at each step and records ``retire_rows``."""

    def __init__(self, script, vocab=8):
        self.script, self.vocab, self.step_no, self.retired = script, vocab, 0, []

    def _logits(self):
        out = torch.zeros(len(self.script[0]), self.vocab)
        out[torch.arange(len(self.script[0])), torch.tensor(self.script[self.step_no])] = 1.0
        self.step_no += 1
        return out

    def prefill(self, input_ids, attention_mask):
        return self._logits()

    def step(self, tokens):
        return self._logits()

    def retire_rows(self, rows):
        self.retired.append((self.step_no, rows.tolist()))


def test_rows_that_stop_are_retired_through_the_proxy_to_every_source():
    """Row 1 picks EOS (id 2) at its 2nd token, row 0 at its 4th: each source of the proxy
    (large, tuned, base) hears of row 1 after the step that stopped it, then of both rows."""
    script = [[5, 6], [5, 2], [5, 0], [2, 0]]
    large, tuned, base = Scripted(script), Scripted(script), Scripted(script)
    proxy = ProxyTunedLM(large, TwoSourceDiff(tuned, base), alpha=1.0)
    ids, mask = torch.tensor([[1, 3], [1, 4]]), torch.ones(2, 2, dtype=torch.long)
    assert decode(proxy, ids, mask, eos_ids=[2], pad_id=0, cfg=Decoding(max_new_tokens=10)) == [[5, 5, 5], [6]]
    for source in (large, tuned, base):
        assert source.retired == [(2, [False, True]), (4, [True, True])]
