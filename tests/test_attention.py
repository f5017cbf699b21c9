"""Packed rows attend row by row (``fedpt.models.attention``): the numbers of each row run alone, less work."""

import json

import pytest
import torch

from fedpt.data.prompts import pack
from fedpt.models.attention import ATTENTION_NAME, row_spans
from fedpt.models.loading import load_model

ROWS = [[5, 9, 13, 2, 7, 11], [3, 4], [8, 6, 10, 12, 14, 15, 16, 1, 17]]  # unequal lengths


def test_row_spans_of_a_packing():
    assert row_spans(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])) == [(0, 3), (3, 5), (5, 9)]
    assert row_spans(torch.tensor([[0, 1, 2, 3]])) is None  # one row: plain causal attention
    assert row_spans(torch.tensor([[0, 1], [0, 1]])) is None  # a batch of rows, not a packing
    assert row_spans(torch.tensor([[4, 5, 0, 1]])) is None  # a continuation: left to the mask
    assert row_spans(torch.tensor([[0, 1, 0, 2]])) is None  # positions that skip
    assert row_spans(None) is None


def _model():
    model = load_model("tiny-small", "float32")
    assert model.config._attn_implementation == ATTENTION_NAME
    return model


def test_packed_rows_give_each_row_alone_logits_and_gradients(fedpt_home):
    """Against each row run by itself (plain causal sdpa, no packing): logits, and the gradients of
    the summed loss, equal the packed run's."""
    model = _model()
    batch = pack([(ids, ids) for ids in ROWS])
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    packed_loss = logits.logsumexp(-1).sum()  # any function of every position's logits
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone, start = [], 0
    for ids in ROWS:
        row_logits = model(input_ids=torch.tensor([ids])).logits[0]
        alone.append(row_logits)
        row_logits.logsumexp(-1).sum().backward()  # gradients add up over rows
    torch.testing.assert_close(logits, torch.cat(alone), rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_attention_runs_on_each_rows_own_triangle(fedpt_home, monkeypatch):
    """The work: one causal SDPA call per row and layer, each on that row's tokens only."""
    model = _model()
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2], kwargs.get("is_causal"), kwargs.get("attn_mask")))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    batch = pack([(ids, ids) for ids in ROWS])
    with torch.no_grad():
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    layers = model.config.num_hidden_layers
    assert calls == [(len(ids), len(ids), True, None) for ids in ROWS] * layers


def test_other_inputs_keep_transformers_sdpa(fedpt_home):
    """A padded batch (masked), decoding with a KV cache, and packed positions with a cache (where
    transformers sees one sequence) take sdpa's path, with its numbers."""
    model = _model()
    reference = load_model("tiny-small", "float32")
    reference.set_attn_implementation("sdpa")
    ids = torch.tensor([[0, 0, 5, 9, 13], [3, 4, 8, 6, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
        mine = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(mine, theirs)
    batch = pack([(ids, ids) for ids in ROWS])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                                   reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                                   rtol=0, atol=0)


def test_a_saved_model_names_no_fedpt_attention(fedpt_home, tmp_path):
    """Exports load anywhere: the attention name is set at load time, never written to config.json."""
    _model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert ATTENTION_NAME not in json.dumps(config)


@pytest.mark.parametrize("chunk", [2, 5])
def test_packed_training_loss_equals_the_padded_batch(fedpt_home, chunk):
    """``response_loss`` of a packed step equals the padded batch's (which goes through sdpa's mask)."""
    from fedpt.data.prompts import collate
    from fedpt.train import response_loss

    model = _model()
    rows = [(ids, [-100] * 2 + ids[2:]) for ids in ROWS]
    padded = response_loss(model, collate(rows, pad_id=0), chunk_tokens=chunk)
    packed = response_loss(model, pack(rows), chunk_tokens=chunk)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
