import copy

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


def test_response_loss_matches_full_logits_loss_and_gradients(tiny_pair, tiny_cfg):
    """The chunked, labelled-positions-only loss equals HF's loss over full (B, T, V) logits, and
    so do the LoRA gradients it produces (chunk size smaller than the batch's label count)."""
    import torch

    from fedpt.data.prompts import collate, encode_sft
    from fedpt.train import response_loss

    tokenizer, small, _ = tiny_pair
    peft = attach_lora(copy.deepcopy(small), tiny_cfg.lora, seed=0)
    with torch.no_grad():  # a non-identity adapter, so the adapter is on the gradient path
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rows = [encode_sft(tokenizer, format_prompt(ex, "alpaca"), ex.response, 64, 128) for ex in _splits().train[:4]]
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
    got_loss, got_grads = loss_and_grads(lambda: response_loss(peft, batch, chunk_tokens=7))
    assert abs(got_loss - want_loss) < 1e-5 * max(1.0, abs(want_loss))
    assert want_grads.keys() == got_grads.keys() and any(g.abs().sum() > 0 for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
