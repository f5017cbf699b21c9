"""The top-k approximation (fedpt.models.openai_topk) as math: hand computations, -inf safety, token mapping.

The server-backed tests are in tests/test_openai_topk.py.
"""

import math

import pytest
import torch

from fedpt.data.prompts import encode_prompts_left
from fedpt.distill import KDBatch, kd_loss
from fedpt.models.logits import LocalLogitSource
from fedpt.models.openai_topk import TokenMapper, TopKRestricted, restrict_topk, topk_to_logits
from fedpt.proxy import Decoding, decode, proxy_logits

NEG_INF = -math.inf


def test_topk_proxy_is_the_hand_computed_renormalised_distribution():
    # Large LM: p = (0.5, 0.05, 0.2, 0.1, 0.05, 0.1); its top-3 is {0, 2, 3} (ties broken by index: 3 before 5).
    probs = [0.5, 0.05, 0.2, 0.1, 0.05, 0.1]
    z_large = torch.tensor([[math.log(p) + 7.0 for p in probs]])  # logits = logprobs + any constant
    diff = torch.tensor([[0.3, 2.0, -0.2, 0.5, 1.0, -1.0]])  # z_tuned - z_base
    alpha = 1.5
    top = restrict_topk(z_large, 3)
    assert torch.isinf(top[0, [1, 4, 5]]).all() and torch.isfinite(top[0, [0, 2, 3]]).all()
    p_topk = torch.softmax(proxy_logits(top, diff, alpha), dim=-1)[0]
    # By hand: p(v) ∝ p_L(v) * exp(alpha * d(v)) over S = {0, 2, 3}, renormalised; 0 elsewhere.
    weights = {0: 0.5 * math.exp(1.5 * 0.3), 2: 0.2 * math.exp(1.5 * -0.2), 3: 0.1 * math.exp(1.5 * 0.5)}
    total = sum(weights.values())
    expected = [weights.get(v, 0.0) / total for v in range(6)]
    assert p_topk.tolist() == pytest.approx(expected, abs=1e-6)
    # The full proxy conditioned on S is the same distribution, and KL(p_topk || p_full) = -log p_full(S).
    p_full = torch.softmax(proxy_logits(z_large, diff, alpha), dim=-1)[0]
    mass_s = float(p_full[[0, 2, 3]].sum())
    kl = sum(q * math.log(q / float(p_full[v])) for v, q in enumerate(expected) if q > 0)
    assert kl == pytest.approx(-math.log(mass_s), abs=1e-6)


def test_topk_with_full_vocabulary_is_the_full_distribution():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.allclose(restrict_topk(logits, 50), torch.log_softmax(logits, -1), atol=1e-6)


def test_topk_to_logits_places_logprobs_at_their_ids():
    out = topk_to_logits([{4: -0.125, 1: -2.5}, {0: -0.75}], vocab_size=6)  # exact in fp32
    assert out[0].tolist() == [NEG_INF, -2.5, NEG_INF, NEG_INF, -0.125, NEG_INF]
    assert out[1, 0] == -0.75 and torch.isinf(out[1, 1:]).all()


def _kd_batch(teacher_logprobs: torch.Tensor, targets: list[int]) -> KDBatch:
    n = len(targets)
    return KDBatch(torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.long),
                   torch.ones(1, n, dtype=torch.bool), torch.tensor(targets), teacher_logprobs)


def test_kd_loss_with_a_topk_teacher_is_the_kl_over_its_support():
    # Teacher: top-2 {1, 3} of a 4-token vocabulary with probabilities 0.6 / 0.2 -> renormalised 0.75 / 0.25.
    teacher = torch.log_softmax(torch.tensor([[NEG_INF, math.log(0.6), NEG_INF, math.log(0.2)]]), dim=-1)
    student = torch.tensor([[0.0, 1.0, 2.0, -1.0]], requires_grad=True)
    loss = kd_loss(student, _kd_batch(teacher, [1]), temperature=1.0, ce_weight=0.0)
    z = sum(math.exp(x) for x in (0.0, 1.0, 2.0, -1.0))
    p_s = {1: math.exp(1.0) / z, 3: math.exp(-1.0) / z}
    expected = 0.75 * math.log(0.75 / p_s[1]) + 0.25 * math.log(0.25 / p_s[3])
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # d KL / d z_s = p_s - p_t (p_t = 0 outside the support)
    p_student = torch.softmax(student.detach(), -1)[0]
    assert student.grad[0].tolist() == pytest.approx((p_student - torch.tensor([0, 0.75, 0, 0.25])).tolist(), abs=1e-6)


def test_kd_loss_with_a_full_teacher_equals_torch_kl_div():
    gen = torch.Generator().manual_seed(1)
    teacher = torch.log_softmax(torch.randn(5, 30, generator=gen) / 2, -1)
    student = torch.randn(5, 30, generator=gen)
    loss = kd_loss(student, _kd_batch(teacher, [0] * 5), temperature=2.0, ce_weight=0.0)
    reference = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1), teacher, log_target=True,
                                           reduction="batchmean") * 4
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_sampling_survives_processors_that_remove_every_topk_candidate(tiny_pair):
    """no_repeat_ngram_size=1 bans every token already in the sequence; with k=2 that often bans
    both candidates. Decoding must go on with the row's unfiltered top-k, not NaN or token 0."""
    tokenizer, _, large = tiny_pair
    ids, mask = encode_prompts_left(tokenizer, ["the the the the the the", "and and the and the"], 64)
    cfg = Decoding(max_new_tokens=10, do_sample=True, no_repeat_ngram_size=1, seed=3)
    out = decode(TopKRestricted(LocalLogitSource(large), 2), ids, mask, [tokenizer.eos_token_id],
                 tokenizer.pad_token_id, cfg)
    # Independent check: teacher-force the produced sequences; every new token is in the large LM's top-2.
    for row, prompt_ids, prompt_mask in zip(out, ids, mask):
        assert row, "nothing generated"
        sequence = torch.tensor([prompt_ids[prompt_mask.bool()].tolist() + row])
        with torch.no_grad():
            logits = large(input_ids=sequence).logits[0]
        tops = logits[-len(row) - 1: -1].topk(2, dim=-1).indices
        assert all(token in top.tolist() for token, top in zip(row, tops))


def test_token_mapper_inverts_single_token_decoding(tiny_pair):
    tokenizer = tiny_pair[0]
    mapper = TokenMapper(tokenizer)
    vocab = tokenizer.get_vocab()
    unmappable = 0
    for token_id in sorted(vocab.values()):
        text = tokenizer.decode([token_id])  # what a server without token ids returns
        if "\ufffd" in text:
            unmappable += 1
            assert mapper.to_id(text) is None
        else:
            assert mapper.to_id(text) == token_id, (token_id, text)
    assert 0 < unmappable < 200  # partial UTF-8 byte tokens only (the byte alphabet's upper half)
    assert mapper.to_id("token_id:17") == 17
    assert mapper.to_id("token_id:x") is None
    # OpenAI spells non-UTF-8 tokens as "bytes:\\xNN": the single-byte token 0xE6.
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    assert mapper.to_id("bytes:\\xe6") == vocab[bytes_to_unicode()[0xE6]]
    assert mapper.to_id("no such token in this vocabulary, surely") is None
