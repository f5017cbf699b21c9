import copy

import torch

from fedpt.bench import with_random_lora
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


def tuned_copy(small, tiny_cfg):
    """A copy of the small LM with a LoRA adapter that changes its logits (B drawn, not zero)."""
    return with_random_lora(copy.deepcopy(small), tiny_cfg.lora, scale=0.5)


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
    peft = tuned_copy(small, tiny_cfg)  # a non-trivial adapter, so tuned != base
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
    peft = tuned_copy(small, tiny_cfg)
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


class Rendezvous(FixedLogits):
    """A step that records its thread; with ``wait_for``, it returns only once that event is set
    (the other part of the proxy step must run meanwhile), else raises."""

    def __init__(self, logits, arrive=None, wait_for=None, fail=False):
        super().__init__(logits)
        self.arrive, self.wait_for, self.fail, self.threads = arrive, wait_for, fail, []

    def step(self, tokens):
        import threading

        self.threads.append(threading.current_thread().name)
        if self.arrive is not None:
            self.arrive.set()
        if self.wait_for is not None and not self.wait_for.wait(timeout=20):
            raise TimeoutError("the other part of the proxy step never ran beside this one")
        if self.fail:
            raise RuntimeError("large LM failed")
        return self.logits


def test_overlapped_step_runs_the_small_diff_beside_the_large_and_gives_the_same_logits():
    import threading

    z_large, z_tuned, z_base = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.0, 4.0]]), torch.zeros(1, 3)
    diff_ran = threading.Event()
    large = Rendezvous(z_large, wait_for=diff_ran)  # returns only after the diff's step started
    tuned = Rendezvous(z_tuned, arrive=diff_ran)
    proxy = ProxyTunedLM(large, TwoSourceDiff(tuned, FixedLogits(z_base)), alpha=1.5, overlap=True)
    logits = proxy.step(torch.tensor([0]))
    assert torch.equal(logits, z_large + 1.5 * (z_tuned - z_base))
    assert large.threads == [threading.current_thread().name] and tuned.threads[0].startswith("fedpt-proxy-diff")
    proxy.close()


def test_beside_a_remote_large_lm_prefill_and_score_run_the_small_lm_meanwhile():
    """A remote large LM computes elsewhere: its prefill and scoring wait on the network, and the
    small LM's run meanwhile (by default); a local one's run in turn (they are bound by compute)."""
    import threading

    class Remote(Rendezvous):
        remote = True

        def prefill(self, input_ids, attention_mask):
            return self.step(None)

        def score(self, input_ids, attention_mask, keep_last=0):
            return self.step(None)[:, None, :].expand(-1, keep_last or input_ids.shape[1], -1)

    class Announcing(FixedLogits):
        def __init__(self, logits, arrive):
            super().__init__(logits)
            self.arrive, self.threads = arrive, []

        def prefill(self, input_ids, attention_mask):
            self.threads.append(threading.current_thread().name)
            self.arrive.set()
            return self.logits

        def score(self, input_ids, attention_mask, keep_last=0):
            self.threads.append(threading.current_thread().name)
            self.arrive.set()
            return super().score(input_ids, attention_mask, keep_last)

    ids, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    for call in ("prefill", "score"):
        arrived = threading.Event()
        large = Remote(torch.zeros(1, 3), wait_for=arrived)  # answers only once the small LM has started
        proxy = ProxyTunedLM(large, TwoSourceDiff(Announcing(torch.ones(1, 3), arrived), FixedLogits(torch.zeros(1, 3))),
                             alpha=2.0)
        out = getattr(proxy, call)(ids, mask)
        assert torch.equal(out.reshape(-1, 3)[-1], torch.full((3,), 2.0))
        proxy.close()
    # told not to overlap, a remote large LM's prefill runs in turn, and a local one's always does
    for large, overlap in ((Remote(torch.zeros(1, 3)), False), (FixedLogits(torch.zeros(1, 3)), None)):
        small = Announcing(torch.ones(1, 3), threading.Event())
        ProxyTunedLM(large, TwoSourceDiff(small, FixedLogits(torch.zeros(1, 3))), 2.0, overlap=overlap).prefill(ids, mask)
        assert small.threads == [threading.current_thread().name]


def test_overlapped_step_waits_for_the_small_diff_when_the_large_fails():
    import threading

    import pytest

    diff_done = threading.Event()

    class SlowDiff(FixedLogits):
        def step(self, tokens):
            diff_started.set()
            import time

            time.sleep(0.2)
            diff_done.set()
            return self.logits

    diff_started = threading.Event()
    large = Rendezvous(torch.zeros(1, 3), wait_for=diff_started, fail=True)
    proxy = ProxyTunedLM(large, TwoSourceDiff(SlowDiff(torch.ones(1, 3)), FixedLogits(torch.zeros(1, 3))), 1.0,
                         overlap=True)
    with pytest.raises(RuntimeError, match="large LM failed"):
        proxy.step(torch.tensor([0]))
    assert diff_done.is_set()  # the small model was not left running behind the error
    proxy.close()


def test_step_overlap_trial_alternates_then_keeps_the_faster_mode_per_batch_size():
    from fedpt.proxy import StepOverlapTrial

    trial = StepOverlapTrial(trials=2)
    modes = []
    timings = {False: iter([1.0, 1.2]), True: iter([0.7, 0.6])}  # overlap clearly faster at batch 1
    for _ in range(4):
        mode = trial.mode(1)
        modes.append(mode)
        trial.record(1, mode, next(timings[mode]))
    assert modes == [False, True, False, True]
    assert trial.mode(1) is True and trial.chosen == {1: True}
    trial.record(1, True, 99.0)  # decided: later steps do not reopen it
    assert trial.mode(1) is True
    # at batch 8 overlap is only 2% faster: not worth a second thread team
    timings = {False: iter([1.0, 1.0]), True: iter([0.98, 0.99])}
    for _ in range(4):
        mode = trial.mode(8)
        trial.record(8, mode, next(timings[mode]))
    assert trial.mode(8) is False and trial.mode(1) is True
    # an overlapped step far slower than the sequential one ends the trial at once
    trial.record(24, False, 1.0)
    trial.record(24, True, 1.6)
    assert trial.chosen[24] is False and trial.runs[24] == 2


def test_auto_overlap_decides_by_timing_and_never_runs_beside_llamacpp(tiny_pair, tiny_cfg):
    import threading

    tokenizer, small, large = tiny_pair
    peft = tuned_copy(small, tiny_cfg)
    cfg = Decoding(max_new_tokens=8)
    sequential = generate_ids(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(peft), 1.0, overlap=False),
                              tokenizer, PROMPTS, cfg, 1, 64)
    overlapped = generate_ids(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(peft), 1.0, overlap=True),
                              tokenizer, PROMPTS, cfg, 1, 64)
    auto = ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(peft), 1.0)
    assert overlapped == sequential == generate_ids(auto, tokenizer, PROMPTS, cfg, 1, 64)
    assert auto.trial is not None and 1 in auto.trial.chosen  # 2 prompts x 7 steps at batch 1: decided

    class SpinningPool(FixedLogits):  # as llama.cpp's sources say of themselves
        holds_cores = True

    tuned = Rendezvous(torch.ones(1, 3))
    for proxy in (ProxyTunedLM(SpinningPool(torch.zeros(1, 3)), TwoSourceDiff(tuned, FixedLogits(torch.zeros(1, 3))), 1.0),
                  ProxyTunedLM(FixedLogits(torch.zeros(1, 3)),
                               TwoSourceDiff(tuned, SpinningPool(torch.zeros(1, 3))), 1.0, overlap=True)):
        for _ in range(6):
            proxy.step(torch.tensor([0]))
        assert proxy.overlap is False and proxy.trial is None
    assert set(tuned.threads) == {threading.current_thread().name}


def test_a_fresh_adapter_is_the_identity_and_a_trained_one_is_not(tiny_pair, tiny_cfg):
    """Round 0's adapter (LoRA B = 0) adds nothing: evaluation engines may run the base model for it."""
    from fedpt.models.lora import adapter_is_identity

    tokenizer, small, _ = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    assert adapter_is_identity(peft)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    # independent check of "adds nothing": the tuned view's logits are the base view's, bit for bit
    assert torch.equal(LocalLogitSource(peft).score(ids, mask), LocalLogitSource(peft, use_adapter=False).score(ids, mask))
    with torch.no_grad():
        next(p for name, p in peft.named_parameters() if "lora_B" in name)[0, 0] = 1e-3
    assert not adapter_is_identity(peft)
