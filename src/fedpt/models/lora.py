"""LoRA adapters through peft: attach, read and write the adapter state (what FedPT sends)."""

from __future__ import annotations

from typing import Any

from fedpt.config import LoraConfig
from fedpt.errors import FedPTError


def attach_lora(model: Any, cfg: LoraConfig, seed: int) -> Any:
    """Wrap ``model`` in a PeftModel with one adapter (``default``); B = 0, so it starts as the base.

    The seed fixes the random A matrices: every system of a run starts from the same adapter.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.targets if t not in names]
    if missing:
        raise FedPTError(f"lora.targets {missing} match no module of {type(model).__name__}; "
                         f"typical names: q_proj, k_proj, v_proj, o_proj")
    torch.manual_seed(seed)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets), task_type="CAUSAL_LM",
    )
    # peft keeps adapter weights in fp32 even on a bf16 base (autocast_adapter_dtype), which
    # is also what lets them travel as numpy arrays (numpy has no bf16).
    return get_peft_model(model, peft_cfg)


def get_adapter_state(model: Any) -> dict[str, Any]:
    """The adapter's tensors (fp32, detached copies): the only thing a device ever sends."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: Any, state: dict[str, Any]) -> None:
    """Load adapter tensors; a key or shape mismatch is an error, never a silent partial load."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    if set(expected) != set(state):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise FedPTError(f"adapter keys do not match the model (missing {missing[:2]}, unexpected {extra[:2]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FedPTError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    set_peft_model_state_dict(model, state)


def adapter_is_identity(model: Any) -> bool:
    """True when every LoRA B matrix is zero: the adapter adds exactly nothing (a fresh adapter,
    round 0), so the model computes what its base does."""
    from peft import get_peft_model_state_dict

    return all(not bool(value.any()) for key, value in get_peft_model_state_dict(model).items() if "lora_B" in key)


def count_trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
