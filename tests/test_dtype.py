"""model.dtype = "auto": bf16 only where this CPU multiplies bf16 at full speed, fp32 elsewhere."""

import pytest
import torch

from fedpt.config import load_config
from fedpt.errors import FedPTError
from fedpt.models import loading


@pytest.mark.parametrize("fast, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_cpus_bf16_matmul(monkeypatch, fast, expected):
    monkeypatch.setattr(loading, "fast_bf16_matmul", lambda: fast)
    assert loading.resolve_dtype("auto") == expected
    assert loading.torch_dtype("auto") == {"bfloat16": torch.bfloat16, "float32": torch.float32}[expected]
    for explicit in ("float32", "bfloat16", "float16"):  # a named dtype is never second-guessed
        assert loading.resolve_dtype(explicit) == explicit


@pytest.mark.parametrize("fast", [True, False])
def test_an_auto_model_loads_in_the_resolved_dtype_and_is_sized_in_it(monkeypatch, fedpt_home, fast):
    monkeypatch.setattr(loading, "fast_bf16_matmul", lambda: fast)
    model = loading.load_model("tiny-small", "auto")
    expected = torch.bfloat16 if fast else torch.float32
    assert {p.dtype for p in model.parameters()} == {expected}
    # Sized from its safetensors headers alone: the bytes of the very parameters just loaded. The
    # tiny models keep lm_head apart from the embeddings, so each parameter is one stored tensor.
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    assert loading.weights_bytes("tiny-small", "auto") == params * (2 if fast else 4)


def test_the_default_presets_choose_per_machine_and_bad_names_are_one_line():
    assert load_config().model.dtype == "auto"
    assert load_config(preset="paper-cpu").model.dtype == "auto"
    with pytest.raises(FedPTError) as error:
        load_config(preset="tiny", overrides=["model.dtype='fp8'"])
    assert "model.dtype" in str(error.value) and "auto" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("given, expected", [(None, "AUTO,STRICT"), ("COMPATIBLE", "COMPATIBLE"), ("", "")])
def test_importing_fedpt_sets_mkl_cbwr_unless_the_user_did(given, expected):
    """MKL reads MKL_CBWR when torch loads it: fedpt sets it on import (reproducible fp32, and 2x
    faster small-row GEMMs on AMD); a value the user gave, even empty, is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | ({} if given is None else {"MKL_CBWR": given})
    out = subprocess.run([sys.executable, "-c", "import os, fedpt; print(repr(os.environ.get('MKL_CBWR')))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == repr(expected)
