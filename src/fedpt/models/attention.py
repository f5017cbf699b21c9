"""Attention over packed rows that computes each row's own causal attention, not the whole packed block.

Packed training rows (``fedpt.data.prompts.pack``: one (1, N) sequence whose ``position_ids``
restart at 0 for each row) reach attention with a block-diagonal causal mask. PyTorch's
``scaled_dot_product_attention`` cannot skip the masked blocks: it scores every query against
all N keys (N² work for four rows of N/4, of which 1/8 is wanted) and, with a mask, also copies
the key/value heads out for grouped-query attention. ``packed_rows_attention`` runs one
``is_causal`` call per row instead: the same attention, computed on the row's own triangle.

Registered with transformers as ``"sdpa_packed_rows"`` (``use_packed_rows_attention(model)``);
any other input (padded batches, a KV cache, a single row) goes to transformers' ``sdpa`` as is.
Where transformers sees no packing (it looks only when there is no KV cache: ``use_cache=False``,
as training passes), neither does this.
"""

from __future__ import annotations

from typing import Any

ATTENTION_NAME = "sdpa_packed_rows"


def row_spans(position_ids: Any) -> list[tuple[int, int]] | None:
    """``[(start, end), ...]`` of the rows packed in a (1, N) ``position_ids`` that restart at 0
    for each row and count up by one inside it; None when it is not such a packing of ≥ 2 rows."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    positions = position_ids[0]
    starts = (positions == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    ends = starts[1:] + [len(positions)]
    expected = torch.cat([torch.arange(end - start) for start, end in zip(starts, ends)])
    if not torch.equal(positions.cpu(), expected):
        return None  # not a plain packing (e.g. a continuation): leave it to the mask
    return list(zip(starts, ends))


def packed_rows_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function interface: (B, heads, T, D) in, (B, T, heads, D) out."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Rows only where transformers itself masked them apart (it builds the block-diagonal mask
    # for packed position_ids without a KV cache; with one, or an unmasked single row, there is none).
    spans = row_spans(kwargs.get("position_ids")) if attention_mask is not None else None
    if (spans is None or query.shape[2] != key.shape[2] or kwargs.get("position_bias") is not None
            or kwargs.get("sliding_window") or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.shape[1] != key.shape[1]  # grouped-query attention: SDPA shares each key/value head itself
    rows = [F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                           dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped)
            for start, end in spans]
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None


def use_packed_rows_attention(model: Any) -> Any:
    """Make ``model`` (a transformers model on ``sdpa``) attend row by row over packed rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, packed_rows_attention)
        # sdpa's masks for the inputs handed on to sdpa (padded batches); unregistered, none is made
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION_NAME)
    return model
