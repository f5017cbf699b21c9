import copy

import pytest
import torch

from fedpt.data.prompts import format_prompt
from fedpt.data.records import load_examples, split_examples
from fedpt.distill import build_kd_batches, distill, pool_kl
from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
from fedpt.models.lora import attach_lora, get_adapter_state
from fedpt.proxy import ProxyTunedLM
from fedpt.train import local_tune


def _splits():
    return split_examples(load_examples("builtin:dolly-tiny"), 16, 32, seed=1)


def test_local_tune_changes_only_the_adapter_and_lowers_loss(tiny_pair, tiny_cfg):
    tokenizer, small, _ = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    base_before = {k: v.clone() for k, v in peft.named_parameters() if "lora_" not in k}
    adapter_before = get_adapter_state(peft)
    data = _splits().train[:16]
    cfg = copy.deepcopy(tiny_cfg.train)
    cfg.steps, cfg.batch_size, cfg.lr = 30, 8, 5e-3
    result = local_tune(peft, tokenizer, data, tiny_cfg.data, cfg, seed=0)
    assert result.last_loss < result.loss  # overfits 16 examples
    after = dict(peft.named_parameters())
    assert all((after[k] == v).all() for k, v in base_before.items())  # frozen base
    assert any((get_adapter_state(peft)[k] != v).any() for k, v in adapter_before.items())


def test_distillation_lowers_teacher_student_kl(tiny_pair, tiny_cfg):
    tokenizer, small, large = tiny_pair
    student = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    prompts = [format_prompt(ex, "alpaca") for ex in _splits().kd_pool[:16]]
    teacher = ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(student), alpha=1.0)
    cfg = copy.deepcopy(tiny_cfg.distill)
    cfg.steps, cfg.lr = 20, 5e-3
    result = distill(teacher, student, tokenizer, prompts, cfg, tiny_cfg.data, seed=0)
    assert result.kl_after < 0.9 * result.kl_before
    assert result.teacher_tokens > 0 and result.steps == 20


def test_pool_kl_is_only_a_diagnostic(tiny_pair, tiny_cfg):
    """distill.pool_kl off (qwen-cpu, paper-cpu) skips the two student passes over the pool and
    trains the very same adapter as with it on."""
    tokenizer, small, large = tiny_pair
    prompts = [format_prompt(ex, "alpaca") for ex in _splits().kd_pool[:8]]
    outcomes = {}
    for pool_kl in (True, False):
        student = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
        teacher = ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(student), alpha=1.0)
        cfg = copy.deepcopy(tiny_cfg.distill)
        cfg.steps, cfg.pool_kl = 3, pool_kl
        result = distill(teacher, student, tokenizer, prompts, cfg, tiny_cfg.data, seed=0)
        outcomes[pool_kl] = (result, get_adapter_state(student))
    (on, state_on), (off, state_off) = outcomes[True], outcomes[False]
    assert on.kl_before > 0 and on.kl_after > 0 and off.kl_before is None and off.kl_after is None
    assert off.loss == on.loss
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_on)


def test_teacher_cache_holds_response_positions_only(tiny_pair, tiny_cfg):
    tokenizer, small, large = tiny_pair
    student = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    teacher = ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(student), alpha=1.0)
    prompts = ["### Instruction:\nHi\n\n### Response:\n", "### Instruction:\nName two colours\n\n### Response:\n"]
    responses = [[300, 301, 302], [400]]
    batches = build_kd_batches(teacher, tokenizer, prompts, responses, tiny_cfg.distill, tiny_cfg.data)
    (batch,) = batches
    # 3 response tokens + EOS, 1 + EOS (both shorter than max_new_tokens, so they ended on EOS)
    assert batch.targets.tolist() == [300, 301, 302, tokenizer.eos_token_id, 400, tokenizer.eos_token_id]
    assert batch.teacher_logprobs.shape == (6, len(tokenizer))
    assert pool_kl(student, batches, 1.0) >= 0


def test_kd_loss_is_forward_kl_at_temperature_times_t_squared_mixed_with_ce():
    """kd_loss on random logits against the formula computed here with plain torch, at T = 2."""
    import torch

    from fedpt.distill import KDBatch, kd_loss

    gen = torch.Generator().manual_seed(0)
    n, vocab, temperature, ce_weight = 6, 11, 2.0, 0.3
    z_teacher, z_student = torch.randn(n, vocab, generator=gen) * 3, torch.randn(n, vocab, generator=gen) * 3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    batch = KDBatch(input_ids=torch.zeros(1, n, dtype=torch.long), attention_mask=torch.ones(1, n),
                    select=torch.ones(1, n, dtype=torch.bool), targets=targets,
                    teacher_logprobs=torch.log_softmax(z_teacher / temperature, dim=-1))
    # Forward KL(p_t || p_s) = sum_v p_t(v) * (log p_t(v) - log p_s(v)), both at temperature T,
    # averaged over the n response tokens; CE is the student's (T = 1) NLL of the teacher's token.
    p_t = torch.exp(z_teacher / temperature) / torch.exp(z_teacher / temperature).sum(-1, keepdim=True)
    p_s = torch.exp(z_student / temperature) / torch.exp(z_student / temperature).sum(-1, keepdim=True)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    nll = -(z_student[torch.arange(n), targets] - z_student.exp().sum(-1).log()).mean()
    assert kl > 0.1 and abs(nll - kl) > 0.1  # distinguishable terms
    torch.testing.assert_close(kd_loss(z_student, batch, temperature, 0.0), temperature**2 * kl)
    torch.testing.assert_close(kd_loss(z_student, batch, temperature, ce_weight),
                               (1 - ce_weight) * temperature**2 * kl + ce_weight * nll)
    torch.testing.assert_close(kd_loss(z_student, batch, temperature, 1.0), nll)
    # The student matching the teacher exactly: KL 0, whatever T.
    torch.testing.assert_close(kd_loss(z_teacher, batch, temperature, 0.0), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_kd_loss_of_a_pool_counts_response_positions_only(tiny_pair, tiny_cfg):
    """The loss distill() optimises, from left-padded batches, equals the same quantity computed
    row by row on unpadded sequences with plain model forwards, at the positions whose next
    token is a response token (the last prompt token up to the one before the final EOS)."""
    import torch

    from fedpt.data.prompts import encode_prompt
    from fedpt.distill import _student_logits, kd_loss

    tokenizer, small, large = tiny_pair
    student = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():  # a student that differs from the small base, so nothing cancels
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    cfg = copy.deepcopy(tiny_cfg.distill)
    cfg.temperature, cfg.ce_weight, cfg.batch_size, cfg.max_new_tokens = 1.7, 0.25, 3, 4
    prompts = ["### Instruction:\nHi\n\n### Response:\n", "### Instruction:\nName two colours\n\n### Response:\n",
               "Tell me about the sun and the moon, please."]
    responses = [[300, 301, 302], [400], [500, 501, 502, 503]]  # the last one fills max_new_tokens: no EOS
    (batch,) = build_kd_batches(LocalLogitSource(large), tokenizer, prompts, responses, cfg, tiny_cfg.data)
    with torch.no_grad():
        loss = kd_loss(_student_logits(student, batch), batch, cfg.temperature, cfg.ce_weight)

    kls, nlls = [], []
    for prompt, response in zip(prompts, responses):
        prompt_ids = encode_prompt(tokenizer, prompt, tiny_cfg.data.max_prompt_tokens)
        text = response + ([tokenizer.eos_token_id] if len(response) < cfg.max_new_tokens else [])
        ids = torch.tensor([prompt_ids + text])
        with torch.no_grad():
            z_t, z_s = large(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
        positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(text))  # predict text[k] at P-1+k
        for pos, target in zip(positions, text):
            log_p_t = torch.log_softmax(z_t[pos] / cfg.temperature, -1)
            log_p_s = torch.log_softmax(z_s[pos] / cfg.temperature, -1)
            kls.append(float((log_p_t.exp() * (log_p_t - log_p_s)).sum()))
            nlls.append(float(-torch.log_softmax(z_s[pos], -1)[target]))
    assert len(kls) == 4 + 2 + 4
    expected = ((1 - cfg.ce_weight) * cfg.temperature**2 * sum(kls) / len(kls)
                + cfg.ce_weight * sum(nlls) / len(nlls))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
@pytest.mark.parametrize("packed", [False, True])
def test_response_loss_matches_full_logits_loss_and_gradients(tiny_pair, tiny_cfg, packed):
    """The chunked, labelled-positions-only loss equals HF's loss over full (B, T, V) logits, and
    so do the LoRA gradients it produces (chunk size smaller than the batch's label count).
    Packed (``train.pack_rows``): the rows end to end in one unpadded sequence give the padded
    batch's loss and gradients; the last row is labelled from its first token on, so a packed row
    that learnt to predict the next row's first token would show."""
    import torch

    from fedpt.data.prompts import collate, encode_sft, pack
    from fedpt.train import response_loss

    tokenizer, small, _ = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():  # a non-identity adapter, so the adapter is on the gradient path
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rows = [encode_sft(tokenizer, format_prompt(ex, "alpaca"), ex.response, 64, 128) for ex in _splits().train[:4]]
    rows.append((rows[1][0][:40], rows[1][0][:40]))  # every token labelled (an LM row)
    batch = collate(rows, tokenizer.pad_token_id)  # right padding: labels at different offsets per row
    assert int((batch["labels"][:, 1:] != -100).sum()) > 3 * 7  # several chunks below

    def loss_and_grads(compute):
        peft.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}

    peft.train()
    # Independent reference: full logits, shifted by hand, mean CE over labelled positions.
    def reference():
        logits = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)

    want_loss, want_grads = loss_and_grads(reference)
    if packed:
        packed_batch = pack(rows)
        real = sum(len(ids) for ids, _ in rows)
        assert packed_batch["input_ids"].shape == (1, real) and real < batch["input_ids"].numel()  # no padding
        got_loss, got_grads = loss_and_grads(lambda: response_loss(peft, packed_batch, chunk_tokens=7))
    else:
        got_loss, got_grads = loss_and_grads(lambda: response_loss(peft, batch, chunk_tokens=7))
    assert abs(got_loss - want_loss) < 1e-5 * max(1.0, abs(want_loss))
    assert want_grads.keys() == got_grads.keys() and any(g.abs().sum() > 0 for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_tokens", [7, 256])
def test_a_frozen_heads_gradient_taken_in_the_forward_pass_is_the_checkpointed_ones_bit_for_bit(
        tiny_pair, tiny_cfg, chunk_tokens):
    """A frozen LM head: the chunk's gradient is taken while its logits exist (one head product per
    chunk forward instead of two; a 256-token chunk's log-softmax ``HEAD_ROWS`` rows at a time); the
    loss and every LoRA gradient are those of the checkpointed path bit for bit. A head that trains
    takes the checkpointed path and gets its gradient."""
    import torch

    from fedpt.train import HEAD_ROWS

    from fedpt.bench import with_random_lora
    from fedpt.data.prompts import encode_sft, pack
    from fedpt.train import response_loss

    tokenizer, small, _ = tiny_pair
    peft = with_random_lora(copy.deepcopy(small), tiny_cfg.lora, scale=0.05)  # the adapter on the gradient path
    rows = [encode_sft(tokenizer, format_prompt(ex, "alpaca"), ex.response, 64, 128) for ex in _splits().train[:8]]
    batch = pack(rows)
    assert int((batch["labels"][:, 1:] != -100).sum()) > chunk_tokens + HEAD_ROWS  # a chunk in pieces, and more
    head = peft.get_base_model().get_output_embeddings()
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))

    def loss_and_grads():
        peft.zero_grad(set_to_none=True)
        calls.clear()
        loss = response_loss(peft, batch, chunk_tokens=chunk_tokens)
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in peft.named_parameters() if "lora_" in n}, list(calls)

    peft.train()
    fused_loss, fused_grads, fused_calls = loss_and_grads()
    head.weight.requires_grad_(True)
    try:
        ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads()
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    finally:
        head.weight.requires_grad_(False)
    chunks = len(fused_calls)
    assert chunks >= 2 and sorted(ckpt_calls) == sorted(fused_calls * 2)  # checkpointing: each chunk's head twice
    assert torch.equal(fused_loss, ckpt_loss)
    assert fused_grads.keys() == ckpt_grads.keys()
    for name, grad in ckpt_grads.items():
        assert torch.equal(fused_grads[name], grad), name
    # a caller that scales the loss gets the scaled gradient (the forward pass assumed the mean's 1/N)
    peft.zero_grad(set_to_none=True)
    (3.0 * response_loss(peft, batch, chunk_tokens=chunk_tokens)).backward()
    for name, grad in fused_grads.items():
        torch.testing.assert_close(dict(peft.named_parameters())[name].grad, 3.0 * grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sample, teacher_batch", [(False, 0), (True, 0), (False, 7)])
def test_teacher_logprobs_kept_from_decoding_equal_a_fresh_scoring(tiny_pair, tiny_cfg, sample, teacher_batch,
                                                                   monkeypatch):
    """distill() keeps the teacher's distributions from its own decoding instead of scoring prompt +
    response again: they must be what the teacher gives those positions when it scores them,
    also when the teacher decodes in other batches (7 + 3 rows) than the student's (4).

    Where each row stops is fixed by construction (``StopAt``), not left to where the tiny models'
    decoding happens to emit EOS (that differs from CPU to CPU): rows stop at once, after 11 tokens
    and at several lengths in between, others run to the budget, greedy and sampled alike, so
    every path is taken."""
    import torch

    import fedpt.distill
    from fedpt.bench import with_random_lora
    from fedpt.proxy import stop_token_ids

    tokenizer, small, large = tiny_pair
    budget, max_prompt = 12, tiny_cfg.data.max_prompt_tokens
    prompts = [format_prompt(ex, "alpaca") for ex in _splits().kd_pool[:10]]
    # Each prompt's length in tokens as the model sees it (long prompts keep their last max_prompt).
    lengths = [min(len(tokenizer(p, add_special_tokens=False)["input_ids"]), max_prompt) for p in prompts]
    # EOS goes at these positions (real tokens counted from 0): row 0 stops at once, row 2 after 11
    # tokens, row 7 after 5; every row stops at the first of them inside its budget, if any.
    at = {lengths[0], lengths[2] + 11, lengths[7] + 5}
    expected = [next((k for k in range(budget) if n + k in at), budget) for n in lengths]
    assert expected[0] == 0 and expected[2] == 11 and expected[7] == 5 and budget in expected
    assert len({k for k in expected if 0 < k < budget}) >= 3  # several early stops besides 0 and 11

    tuned = with_random_lora(copy.deepcopy(small), tiny_cfg.lora, scale=0.2)  # tuned != base
    teacher = StopAt(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(tuned), alpha=1.5),
                     tokenizer.eos_token_id, stop_token_ids(tokenizer), at)
    cfg = copy.deepcopy(tiny_cfg.distill)
    cfg.max_new_tokens, cfg.batch_size, cfg.temperature, cfg.steps = budget, 4, 2.0, 1
    cfg.teacher_decoding = "sample" if sample else "greedy"
    cfg.teacher_batch_size = teacher_batch
    seen = {}

    def build_kd_batches_spy(teacher_, tokenizer_, prompts_, responses, cfg_, data_cfg, teacher_logprobs=None):
        """What distill() hands on: its responses and the log-probabilities it kept while decoding."""
        assert teacher_logprobs is not None  # kept, not left for build_kd_batches to score again
        seen.update(responses=responses, rescored=build_kd_batches(teacher_, tokenizer_, prompts_, responses, cfg_,
                                                                   data_cfg))
        seen["kept"] = build_kd_batches(teacher_, tokenizer_, prompts_, responses, cfg_, data_cfg, teacher_logprobs)
        return seen["kept"]

    monkeypatch.setattr(fedpt.distill, "build_kd_batches", build_kd_batches_spy)
    distill(teacher, copy.deepcopy(tuned), tokenizer, prompts, cfg, tiny_cfg.data, seed=5)
    assert [len(r) for r in seen["responses"]] == expected
    # one position per response token, plus the stop token's where a row stopped before the budget
    assert sum(len(b.targets) for b in seen["rescored"]) == sum(k + (k < budget) for k in expected)
    for a, b in zip(seen["kept"], seen["rescored"], strict=True):
        assert torch.equal(a.targets, b.targets) and a.teacher_logprobs.shape == b.teacher_logprobs.shape
        assert torch.allclose(a.teacher_logprobs, b.teacher_logprobs, atol=1e-4)


class StopAt:
    """A LogitSource that stops every row exactly where the token it predicts sits at a position in
    ``at`` (a row's real tokens counted from 0, whatever the padding), and never elsewhere.

    There EOS gets the row's largest logit + 200, elsewhere the largest - 200; the other stop tokens
    always get - 200. exp(-200) is 0 in fp32, so neither greedy nor sampled decoding can pick
    otherwise, on any CPU. Decoding (``prefill``, ``step``) and scoring (``score``) count positions
    the same way, so both see the same distributions.
    """

    def __init__(self, source, eos_id: int, stop_ids: list[int], at: set[int]) -> None:
        import torch

        self.source, self.eos_id = source, eos_id
        self.others = [i for i in stop_ids if i != eos_id]
        self.at = torch.tensor(sorted(at))
        self._next = None  # per row: the position of the token the next logits predict

    def _shaped(self, logits, positions):
        import torch

        logits = logits.clone()
        top = logits.max(dim=-1).values
        logits[..., self.others] = (top - 200.0)[..., None]
        logits[..., self.eos_id] = torch.where(torch.isin(positions, self.at), top + 200.0, top - 200.0)
        return logits

    def prefill(self, input_ids, attention_mask):
        self._next = attention_mask.sum(dim=-1)  # the prompt's real tokens sit at 0 .. n-1
        return self._shaped(self.source.prefill(input_ids, attention_mask), self._next)

    def step(self, tokens):
        self._next = self._next + 1
        return self._shaped(self.source.step(tokens), self._next)

    def score(self, input_ids, attention_mask, keep_last=0):
        logits = self.source.score(input_ids, attention_mask, keep_last)  # (B, K, V)
        predicts = attention_mask.cumsum(dim=-1)  # logits at a real token predict the position after it
        return self._shaped(logits, predicts[:, predicts.shape[1] - logits.shape[1]:])

    def close(self):
        self.source.close()


def test_packed_kd_batches_give_the_padded_batches_logits_and_gradients(tiny_pair, tiny_cfg):
    """``distill.pack_rows``: a KD batch without its left padding (rows end to end, positions
    restarting) gives the student the same logits at the same response positions, in the same
    order as the teacher's targets, and the same loss gradients, as the padded batch."""
    from fedpt.distill import _student_logits, kd_loss, packed

    tokenizer, small, large = tiny_pair
    cfg = copy.deepcopy(tiny_cfg.distill)
    cfg.batch_size, cfg.max_new_tokens = 4, 6
    prompts = [format_prompt(ex, "alpaca") for ex in _splits().kd_pool[:4]]
    # responses of different lengths, two shorter than the budget (they end on EOS)
    responses = [tokenizer(text, add_special_tokens=False)["input_ids"][:cfg.max_new_tokens]
                 for text in ("Paris is the capital", "yes", "one two three four five six seven", "a b")]
    (batch,) = build_kd_batches(LocalLogitSource(large), tokenizer, prompts, responses, cfg, tiny_cfg.data)
    pack = packed(batch)
    real = int(batch.attention_mask.sum())
    assert pack.input_ids.shape == (1, real) and real < batch.input_ids.numel()  # the padding is gone
    student = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():  # a non-identity adapter: it is on the gradient path
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))

    def logits_and_grads(kd_batch):
        student.zero_grad(set_to_none=True)
        logits = _student_logits(student, kd_batch)
        kd_loss(logits, kd_batch, 2.0, 0.3).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    want_logits, want_grads = logits_and_grads(batch)
    got_logits, got_grads = logits_and_grads(pack)
    assert want_logits.shape == (len(batch.targets), len(tokenizer))
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
