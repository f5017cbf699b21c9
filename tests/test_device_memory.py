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
