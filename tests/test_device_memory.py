"""Device training with activation checkpointing: the same update, each decoder layer run twice per step."""

import pytest
import torch

from fedpt.config import DataConfig, LoraConfig, TrainConfig
from fedpt.data.records import load_examples
from fedpt.models.loading import load_model, load_tokenizer
from fedpt.models.lora import attach_lora, get_adapter_state
from fedpt.train import local_tune


def tune(checkpointing: bool) -> tuple[dict, int]:
    model = attach_lora(load_model("tiny-small", "float32"), LoraConfig(), seed=0)
    calls = []
    layer = model.get_base_model().get_decoder().layers[0]
    layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    examples = load_examples("builtin:dolly-tiny")[:8]
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, gradient_checkpointing=checkpointing)
    local_tune(model, load_tokenizer("tiny-small"), examples, DataConfig(), cfg, seed=0)
    return get_adapter_state(model), len(calls)


def test_checkpointing_recomputes_each_layer_and_changes_no_update(fedpt_home):
    plain, plain_calls = tune(False)
    checkpointed, checkpointed_calls = tune(True)
    assert plain_calls == 2  # one forward per step
    assert checkpointed_calls == 4  # and one recomputation per step in the backward pass
    assert plain.keys() == checkpointed.keys()
    assert any(float(t.abs().max()) > 0 for k, t in plain.items() if "lora_B" in k)  # it trained
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_the_flag_is_a_config_key():
    from fedpt.config import load_config

    assert load_config(preset="tiny").train.gradient_checkpointing is True
    assert load_config(preset="tiny", overrides=["train.gradient_checkpointing=false"]).train.gradient_checkpointing \
        is False
    with pytest.raises(Exception):
        load_config(preset="tiny", overrides=["train.gradient_checkpointing=7"])


def tune_keeping(budget_mb: int, dropout: float = 0.0, monkeypatch=None,
                 bytes_per_token: float = 0.0, probe_first: bool = True) -> tuple[dict, list[int], float, int]:
    """One packed step with ``train.activation_memory_mb=budget_mb``: the adapter, each layer's
    forward calls (2 where it recomputes, 1 where it keeps its activations), layers kept, tokens.
    With ``bytes_per_token``, that is what a layer keeps per token (instead of the probe's count)."""
    if bytes_per_token:
        monkeypatch.setattr("fedpt.train.layer_bytes_per_token", lambda *_: bytes_per_token)
    model = attach_lora(load_model("tiny-small", "float32"), LoraConfig(dropout=dropout), seed=0)
    from fedpt.train import layer_bytes_per_token

    if probe_first:
        layer_bytes_per_token(model.get_base_model())  # memoised: its probe forward is not counted below
    layers = model.get_base_model().get_decoder().layers
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-2, pack_rows=True, activation_memory_mb=budget_mb)
    result = local_tune(model, load_tokenizer("tiny-small"), load_examples("builtin:dolly-tiny")[:8], DataConfig(),
                        cfg, seed=0)
    return get_adapter_state(model), calls, result.layers_kept, result.tokens


def test_layers_within_the_budget_keep_activations_and_change_no_update(fedpt_home, monkeypatch):
    recomputed, recomputed_calls, none_kept, tokens = tune_keeping(0)
    kept, kept_calls, all_kept, _ = tune_keeping(10**6)
    assert (recomputed_calls, none_kept) == ([2, 2], 0)
    assert (kept_calls, all_kept) == ([1, 1], 2)
    # 1 MiB holds one layer of this step, not two: the last layer keeps, the first recomputes
    partial, partial_calls, partial_kept, _ = tune_keeping(1, monkeypatch=monkeypatch,
                                                          bytes_per_token=2**20 / (1.5 * tokens))
    assert (partial_calls, partial_kept) == ([2, 1], 1)
    assert any(float(t.abs().max()) > 0 for k, t in recomputed.items() if "lora_B" in k)  # it trained
    for key in recomputed:
        assert torch.equal(kept[key], recomputed[key]) and torch.equal(partial[key], recomputed[key]), key


def test_the_bytes_probe_draws_no_dropout_mask_from_training(fedpt_home):
    # the probe runs inside training here, with dropout on: it must not move the masks' random stream
    recomputed, _, _, _ = tune_keeping(0, dropout=0.2, probe_first=False)
    kept, _, kept_layers, _ = tune_keeping(10**6, dropout=0.2, probe_first=False)
    assert kept_layers == 2
    for key in recomputed:
        assert torch.equal(kept[key], recomputed[key]), key


@pytest.mark.parametrize("packed", [True, False])
def test_bytes_per_token_is_what_a_training_step_keeps_per_layer(fedpt_home, packed):
    """The probe's bytes per token, against the bytes a real step's layers keep, counted here."""
    from fedpt.data.prompts import collate, encode_sft, format_prompt, pack
    from fedpt.models.lean_mlp import lean_gated_mlps
    from fedpt.train import layer_bytes_per_token

    for lean in (False, True):
        model = attach_lora(load_model("tiny-small", "float32"), LoraConfig(), seed=0)
        causal_lm = (lean_gated_mlps if lean else (lambda m: m))(model.get_base_model())
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        tokenizer = load_tokenizer("tiny-small")
        rows = [encode_sft(tokenizer, format_prompt(ex, DataConfig().template, tokenizer), ex.response, 256, 512)
                for ex in load_examples("builtin:dolly-tiny")[:4]]
        batch = pack(rows) if packed else collate(rows, tokenizer.pad_token_id)
        for layer in causal_lm.get_decoder().layers:
            layer.gradient_checkpointing = False
        weights = {p.data_ptr() for p in causal_lm.parameters()}
        saved: dict[int, set[tuple[int, int]]] = {}
        layer_of: list[int] = []

        def pack_hook(tensor):
            if layer_of and tensor.untyped_storage().data_ptr() not in weights:
                saved.setdefault(layer_of[-1], set()).add((tensor.untyped_storage().data_ptr(),
                                                            tensor.untyped_storage().nbytes()))
            return tensor

        for index, layer in enumerate(causal_lm.get_decoder().layers):
            layer.register_forward_pre_hook(lambda *_, i=index: layer_of.append(i))
            layer.register_forward_hook(lambda *_: layer_of.clear())  # returns None: the output stays
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            causal_lm.get_decoder()(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        tokens = batch["input_ids"].numel()
        from fedpt.train import row_length

        per_token = layer_bytes_per_token(causal_lm, packed, row_length(batch))
        everywhere = set.intersection(*saved.values())  # the mask, the rotary tables: made once, not per layer
        counted = max(sum(n for _, n in storages - everywhere) for storages in saved.values())
        assert tokens > 100 and len(saved) == 2
        assert counted <= per_token * tokens <= 1.1 * counted, (lean, per_token * tokens, counted)
        if not lean:
            plain = per_token
    config = causal_lm.config
    assert plain - per_token == 4 * config.intermediate_size  # a lean MLP keeps one fp32 intermediate less


def test_keep_activations_keeps_the_last_layers_that_fit():
    from types import SimpleNamespace

    from fedpt.train import keep_activations

    layers = [SimpleNamespace(gradient_checkpointing=True) for _ in range(5)]
    assert keep_activations(layers, budget_bytes=3000, bytes_per_token=10, tokens=100) == 3
    assert [layer.gradient_checkpointing for layer in layers] == [True, True, False, False, False]
    assert keep_activations(layers, budget_bytes=999, bytes_per_token=10, tokens=100) == 0
    assert all(layer.gradient_checkpointing for layer in layers)
    assert keep_activations(layers, budget_bytes=10**9, bytes_per_token=10, tokens=100) == 5


def test_the_activation_budget_is_a_checked_config_key():
    from fedpt.config import load_config
    from fedpt.errors import FedPTError

    assert load_config(preset="tiny", overrides=["train.activation_memory_mb=256"]).train.activation_memory_mb == 256
    with pytest.raises(FedPTError, match="train.activation_memory_mb must be in"):
        load_config(preset="tiny", overrides=["train.activation_memory_mb=-1"])


def test_a_lean_gated_mlp_gives_the_same_loss_and_gradients_bit_for_bit(fedpt_home):
    from fedpt.models.lean_mlp import lean_gated_mlps

    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    results = []
    for lean in (False, True):
        model = attach_lora(load_model("tiny-small", "float32"), LoraConfig(), seed=0)
        if lean:
            lean_gated_mlps(model)
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain), (lean_loss, lean) = results
    assert torch.equal(lean_loss, plain_loss)
    assert plain.keys() == lean.keys() and any("layers.0." in name for name in plain)  # reached through MLPs
    for name in plain:
        assert torch.equal(lean[name], plain[name]), name
