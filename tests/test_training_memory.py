"""Devices keep bf16-stored frozen weights in bf16 and compute in fp32: the fp32 model's numbers, half the bytes."""

import copy

import pytest
import torch

from fedpt.models.loading import load_model, load_model_for_training, stored_dtype
from fedpt.models.lora import attach_lora, get_adapter_state, set_adapter_state


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_pair, tmp_path_factory):
    """The tiny small model rounded to bf16 and saved so, as the real models' cache stores them."""
    tokenizer, small, _ = tiny_pair
    path = tmp_path_factory.mktemp("bf16-model")
    copy.deepcopy(small).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def frozen_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def test_bf16_stored_weights_give_the_fp32_models_logits_losses_and_adapter(bf16_checkpoint, tiny_cfg, tiny_pair):
    from fedpt.data.records import load_examples
    from fedpt.train import local_tune

    assert stored_dtype(bf16_checkpoint) == "bfloat16"
    reference = load_model(bf16_checkpoint, "float32")  # fp32 copies of the same bf16 values
    lean = load_model_for_training(bf16_checkpoint, "float32")
    assert {p.dtype for p in lean.parameters()} == {torch.bfloat16}
    assert 2 * frozen_bytes(lean) == frozen_bytes(reference)

    ids = torch.randint(0, 2000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, lean(ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)

    # Two LoRA steps with activation checkpointing, as a device runs them: the second step's
    # loss depends on the first step's gradients, so equal losses and adapters mean equal grads.
    tokenizer = tiny_pair[0]
    examples = load_examples(tiny_cfg.data.source)[:8]
    train = copy.deepcopy(tiny_cfg.train)
    train.steps, train.batch_size, train.gradient_checkpointing = 2, 4, True
    results, adapters, start = [], [], None
    for model in (reference, lean):
        peft_model = attach_lora(model, tiny_cfg.lora, seed=0)
        # A device's adapter is the server's broadcast, never its own init (peft draws A in the
        # base's dtype, so a bf16 base would start from bf16-rounded A matrices).
        start = start or get_adapter_state(peft_model)
        set_adapter_state(peft_model, start)
        torch.manual_seed(7)  # LoRA dropout draws from the global generator
        results.append(local_tune(peft_model, tokenizer, examples, tiny_cfg.data, train, seed=3))
        adapters.append(get_adapter_state(peft_model))
    assert results[0].loss == results[1].loss and results[0].last_loss == results[1].last_loss
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(adapters[0][k].abs().sum() > 0 for k in adapters[0] if "lora_B" in k)  # it did train


def test_fp32_checkpoints_and_bf16_compute_load_as_they_are(fedpt_home):
    # tiny-small is stored in fp32: rounding it to bf16 would change the model, so it is not done.
    assert stored_dtype("tiny-small") == "float32"
    model = load_model_for_training("tiny-small", "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(next(model.parameters()), next(load_model("tiny-small", "float32").parameters()))


@pytest.mark.parametrize("block", [None, 2**12], ids=["whole", "in-blocks"])
def test_backward_keeps_the_stored_weights_not_fp32_copies(bf16_checkpoint, tiny_cfg, monkeypatch, block):
    """The KD student trains without activation checkpointing: whatever autograd saves for the
    backward pass lives until it, so an fp32 copy of each frozen weight saved there would cost
    more than the fp32 model. The lean model must save the bf16 parameters themselves, and its
    logits and gradients must still be the fp32 model's, also when the head (2,048 x 64 here)
    is upcast a block of rows at a time, as the real models' heads are."""
    import fedpt.models.loading as loading

    if block is not None:
        monkeypatch.setattr(loading, "UPCAST_BLOCK_ELEMENTS", block)  # 64 rows of 64: the head in 32 blocks
    reference = attach_lora(load_model(bf16_checkpoint, "float32"), tiny_cfg.lora, seed=0)
    lean = attach_lora(load_model_for_training(bf16_checkpoint, "float32"), tiny_cfg.lora, seed=0)
    generator = torch.Generator().manual_seed(2)  # non-zero B: gradients reach every A through the frozen layers
    start = {k: v if "lora_A" in k else 0.1 * torch.randn(v.shape, generator=generator)
             for k, v in get_adapter_state(reference).items()}
    set_adapter_state(reference, start)
    set_adapter_state(lean, start)
    head = lean.get_output_embeddings().weight
    assert block is None or head.shape[0] > block // head.shape[1]  # the blocked path is the one taken
    frozen = {p.data_ptr() for p in lean.parameters() if not p.requires_grad}
    frozen_shapes = {tuple(p.shape) for p in lean.parameters() if not p.requires_grad and p.dim() == 2}
    copies = []

    def pack(tensor):  # every tensor autograd keeps for the backward pass
        if tensor.dtype == torch.float32 and tuple(tensor.shape) in frozen_shapes and tensor.data_ptr() not in frozen:
            copies.append(tuple(tensor.shape))
        return tensor

    ids = torch.randint(0, 2000, (2, 13), generator=torch.Generator().manual_seed(1))
    grads, logits = [], []
    for model in (reference, lean):
        model.train()
        torch.manual_seed(7)  # LoRA dropout draws from the global generator
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        logits.append(out.logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        if model is reference:
            copies.clear()  # the fp32 model saves its own parameters: not copies
    assert copies == []
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in grads[1].values())


@pytest.mark.parametrize("engine, distils, lean", [("llamacpp", True, True), ("llamacpp", False, False),
                                                   ("torch", True, False)])
def test_the_server_student_is_lean_only_where_torch_never_decodes_it(bf16_checkpoint, monkeypatch, engine,
                                                                      distils, lean):
    """The server's torch small LM keeps bf16-stored weights (upcast on use) when it is only the
    KD student: llama.cpp decodes every view of it. Where torch decodes it (eval engine torch, or
    a command that only evaluates) it stays full-width: decoding is bound by reading weights."""
    pytest.importorskip("llama_cpp")
    from fedpt.config import load_config
    from fedpt.server import ServerModels, load_splits

    cfg = load_config(preset="tiny", overrides=[f"model.small={bf16_checkpoint}", f"model.eval_engine={engine}",
                                                f"model.large_backend={'llamacpp' if engine == 'llamacpp' else 'local'}",
                                                f"model.small_proxy_backend={'llamacpp' if engine == 'llamacpp' else 'torch'}"])
    server = ServerModels.load(cfg, load_splits(cfg), large_trainable=False, distils=distils)
    frozen = {p.dtype for p in server.small.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if lean else {torch.float32})
