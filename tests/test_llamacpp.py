"""The frozen large LM run by llama.cpp (``model.large_backend = "llamacpp"``): the GGUF export of
a model directory, llama.cpp's logits against the torch model's on left-padded batches, a FedPT run
against the same run with the local large LM, and the bad paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fedpt.cli import main
from fedpt.config import load_config
from fedpt.errors import FedPTError
from fedpt.models.logits import LocalLogitSource

from .conftest import FAST as FAST_TINY
from .conftest import FEDPT_2_ROUNDS

llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp bindings not installed (pip install 'fedpt[llamacpp]')")

# llama.cpp runs f32 GGUF matmuls in its own kernels (other summation order, f16 KV cache):
# the logits agree with torch's fp32 to a few thousandths on these models, not bit for bit.
ATOL = 2e-2


@pytest.fixture(scope="module")
def tiny_large_gguf(fedpt_home) -> Path:
    from fedpt.models.llamacpp import gguf_path

    return gguf_path("tiny-large")


@pytest.fixture(scope="module")
def engine(tiny_large_gguf):
    from fedpt.models.llamacpp import LlamaCppModel

    model = LlamaCppModel(tiny_large_gguf, threads=1)
    model.prompt_states = None  # the tests here count what each prefill computes: none may reuse another's
    return model


def padded_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def count_decoded(monkeypatch) -> list[int]:
    """The tokens of each llama_decode call llama.cpp sources make from now on, in order."""
    from fedpt.models.llamacpp import LlamaCppLogitSource

    computed, decode = [], LlamaCppLogitSource._decode
    monkeypatch.setattr(LlamaCppLogitSource, "_decode",
                        lambda self, handle, tokens: computed.append(len(tokens)) or decode(self, handle, tokens))
    return computed


TEXTS = ["The quick brown fox", "A much longer prompt about the weather and the sea, with more words in it", "Hi"]


def test_exported_gguf_holds_the_same_model(tiny_pair, tiny_large_gguf):
    """Independent reader: transformers' own GGUF loader gives back the same weights and logits."""
    from fedpt.models.loading import load_gguf

    tokenizer, _, large = tiny_pair
    reloaded, _ = load_gguf(tiny_large_gguf, "float32")
    ids, mask = padded_batch(tokenizer, TEXTS)
    torch.testing.assert_close(LocalLogitSource(reloaded).score(ids, mask), LocalLogitSource(large).score(ids, mask))


def test_llamacpp_logits_equal_torch_on_left_padded_batches(tiny_pair, engine):
    tokenizer, _, large = tiny_pair
    ids, mask = padded_batch(tokenizer, TEXTS)
    reference, source = LocalLogitSource(large), engine.source()
    assert engine.n_vocab == large.config.vocab_size
    torch.testing.assert_close(source.prefill(ids, mask), reference.prefill(ids, mask), atol=ATOL, rtol=0)
    for step in range(6):  # decoding extends every row's own KV stream at its own position
        tokens = torch.tensor([5 + step, 100 + step, 1000 + step])
        torch.testing.assert_close(source.step(tokens), reference.step(tokens), atol=ATOL, rtol=0)
    # whole-sequence scoring: the kept window of each row; padding positions are zeros
    full = LocalLogitSource(large).score(ids, mask, keep_last=5)
    scored = source.score(ids, mask, keep_last=5)
    real = mask[:, -5:].bool()
    torch.testing.assert_close(scored[real], full[real], atol=ATOL, rtol=0)
    assert (scored[~real] == 0).all() and (~real).any()
    # and a new session after scoring starts from an empty cache
    torch.testing.assert_close(source.prefill(ids[:1], mask[:1]), reference.prefill(ids[:1], mask[:1]),
                               atol=ATOL, rtol=0)
    source.close()
    with pytest.raises(RuntimeError, match="before prefill"):
        source.step(torch.tensor([1]))


def test_a_batch_larger_than_one_llama_decode_call(tiny_pair, engine, monkeypatch):
    """Prompts longer than a llama_decode chunk are fed in pieces; the logits do not change."""
    from fedpt.models.llamacpp import LlamaCppLogitSource

    tokenizer = tiny_pair[0]
    ids, mask = padded_batch(tokenizer, TEXTS)
    whole = engine.source().prefill(ids, mask)
    monkeypatch.setattr(LlamaCppLogitSource, "CHUNK", 7)
    torch.testing.assert_close(engine.source().prefill(ids, mask), whole, atol=1e-4, rtol=0)


HEADER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\n")
SHARED_ATOL = 2e-3
BIRDS = "Name three birds that cannot fly and live on islands far away, in the southern ocean"
SHARED = [HEADER + BIRDS + ".", "Hi", HEADER + BIRDS + ", and say why they cannot fly.",
          HEADER + "Add 2 and 3.", "Hi there, how are you", HEADER.replace(", paired with an input that provides "
                                                                          "further context", "") + "Add 4 and 5."]


def test_rows_sharing_a_prefix_compute_it_once_and_decode_as_if_alone(tiny_pair, engine, monkeypatch):
    """Prefill with shared prefixes (the template header computed once, its KV copied to the other
    rows' streams) gives the logits of the same batch without sharing, at prefill and at every
    decoding step after it; and it computes fewer tokens."""
    ids, mask = padded_batch(tiny_pair[0], SHARED)
    computed = count_decoded(monkeypatch)
    shared = engine.source()
    monkeypatch.setenv("FEDPT_LLAMACPP_SHARE_PREFIX", "off")
    alone = engine.source()
    # Not bit for bit: the rows' tokens go through llama.cpp in other batch shapes (other kernels'
    # rounding); a wrong or missing copy moves logits by far more (see the mutations in the notes).
    torch.testing.assert_close(shared.prefill(ids, mask), alone.prefill(ids, mask), atol=SHARED_ATOL, rtol=0)
    with_sharing, without = computed[:-1], computed[-1]
    header = len(tiny_pair[0](HEADER)["input_ids"])
    encoded = [tiny_pair[0](text)["input_ids"] for text in SHARED]
    opening = len(os.path.commonprefix([encoded[0], encoded[5]]))  # where the two headers part
    birds = len(os.path.commonprefix([encoded[0], encoded[2]]))  # "... in the southern ocean"
    # A prefix tree: the two headers' common opening once for four rows, the long header's rest
    # once for three, BIRDS once for two; "Hi" and "Hi there" share too little to be worth a copy.
    saved = 3 * opening + 2 * (header - opening) + (birds - header)
    assert len(os.path.commonprefix([encoded[1], encoded[4]])) < 3 and birds > header + 16 > opening + 16 > 24
    assert sum(with_sharing) == int(mask.sum()) - saved and without == int(mask.sum())
    for step in range(4):
        tokens = torch.tensor([7 + step, 50 + step, 300 + step, 9, 11, 400 + step])
        torch.testing.assert_close(shared.step(tokens), alone.step(tokens), atol=SHARED_ATOL, rtol=0)
    monkeypatch.setenv("FEDPT_LLAMACPP_SHARE_PREFIX", "of")
    with pytest.raises(FedPTError, match="FEDPT_LLAMACPP_SHARE_PREFIX='of': expected on or off"):
        engine.source()
    monkeypatch.delenv("FEDPT_LLAMACPP_SHARE_PREFIX")
    # and against torch, row by row
    torch.testing.assert_close(engine.source().prefill(ids, mask), LocalLogitSource(tiny_pair[2]).prefill(ids, mask),
                               atol=ATOL, rtol=0)


def test_prompt_states_give_a_seen_prompt_its_stream_back_instead_of_computing_it(tiny_pair, tiny_cfg, tmp_path,
                                                                                   monkeypatch):
    """A later session's prompts seen before (same model, same adapter) are restored, not computed:
    their prefill logits are the stored ones, and the steps after them decode as the batch computed
    from scratch does (and as torch does). Another adapter's prompts are not reused."""
    from fedpt.bench import with_random_lora
    from fedpt.models.llamacpp import LlamaCppModel, export_lora_gguf, gguf_path
    from fedpt.models.loading import load_model

    tokenizer = tiny_pair[0]
    computed = count_decoded(monkeypatch)
    monkeypatch.setenv("FEDPT_LLAMACPP_SHARE_PREFIX", "off")  # count each prompt's own tokens
    engine = LlamaCppModel(gguf_path("tiny-small"), threads=1)
    small = load_model("tiny-small", "float32")
    first_ids, first_mask = padded_batch(tokenizer, SHARED[:3])
    first = engine.source()
    first_logits = first.prefill(first_ids, first_mask)
    assert sum(computed) == int(first_mask.sum()) and engine.prompt_states.misses == 3
    later = [SHARED[2], "A prompt nobody has seen before", SHARED[0]]  # two seen, in other rows and padding
    ids, mask = padded_batch(tokenizer, later)
    computed.clear()
    again = engine.source().prefill(ids, mask)
    assert computed == [int(mask[1].sum())] and engine.prompt_states.hits == 2
    assert torch.equal(again[0], first_logits[2]) and torch.equal(again[2], first_logits[0])
    monkeypatch.setenv("FEDPT_LLAMACPP_PROMPT_STATES", "0")
    fresh_engine = LlamaCppModel(gguf_path("tiny-small"), threads=1)
    assert fresh_engine.prompt_states is None
    restored, fresh, reference = engine.source(), fresh_engine.source(), LocalLogitSource(small)
    for source in (restored, fresh, reference):
        source.prefill(ids, mask)
    for step in range(3):
        tokens = torch.tensor([5 + step, 60 + step, 600 + step])
        got = restored.step(tokens)
        torch.testing.assert_close(got, fresh.step(tokens), atol=SHARED_ATOL, rtol=0)
        torch.testing.assert_close(got, reference.step(tokens), atol=ATOL, rtol=0)
    # a tuned view of the same prompts computes them: its keys and values are not the base's
    tuned = with_random_lora(load_model("tiny-small", "float32"), tiny_cfg.lora)
    adapter = engine.load_adapter(export_lora_gguf(tuned, tmp_path / "adapter.gguf"))
    computed.clear()
    tuned_logits = engine.source(adapter).prefill(first_ids, first_mask)
    assert sum(computed) == int(first_mask.sum())
    torch.testing.assert_close(tuned_logits, LocalLogitSource(tuned).prefill(first_ids, first_mask), atol=ATOL, rtol=0)
    assert (tuned_logits - first_logits).abs().max() > 0.05
    monkeypatch.setenv("FEDPT_LLAMACPP_PROMPT_STATES", "lots")
    with pytest.raises(FedPTError, match="FEDPT_LLAMACPP_PROMPT_STATES='lots': expected MiB"):
        LlamaCppModel(gguf_path("tiny-small"), threads=1)


def test_prompt_states_keep_the_most_recent_within_their_budget():
    from fedpt.models.llamacpp import PromptStates

    states = PromptStates(budget=1000)
    logits = torch.zeros(25)  # 100 bytes
    for n in range(4):
        states.put((None, (n,)), bytes(200), logits)  # 300 bytes each
    assert list(states.entries) == [(None, (1,)), (None, (2,)), (None, (3,))] and states.size == 900
    assert states.get((None, (1,))) is not None  # used: now the most recent
    states.put((None, (9,)), bytes(200), logits)
    assert list(states.entries) == [(None, (3,)), (None, (1,)), (None, (9,))]  # 2 went: least recently used
    states.put((None, (10,)), bytes(2000), logits)  # larger than the budget: not kept, nothing evicted
    assert len(states.entries) == 3 and states.get(("other adapter", (1,))) is None


def test_retired_rows_leave_the_steps_and_the_others_decode_as_before(tiny_pair, engine, monkeypatch):
    """A row the decoding session will not read again (it stopped) is left out of later steps:
    fewer tokens go to llama.cpp, its logits are zeros, and the other rows' logits are those of
    the same session without retiring (the torch source's, within llama.cpp's tolerance)."""
    from fedpt.proxy import retire_rows

    ids, mask = padded_batch(tiny_pair[0], SHARED[:4])
    computed = count_decoded(monkeypatch)
    retiring, reference = engine.source(), LocalLogitSource(tiny_pair[2])
    retiring.prefill(ids, mask)
    reference.prefill(ids, mask)
    for step in range(3):
        tokens = torch.tensor([7 + step, 50 + step, 300 + step, 9])
        if step == 1:
            retire_rows(retiring, torch.tensor([False, True, False, True]))
        computed.clear()
        got, want = retiring.step(tokens), reference.step(tokens)
        live = [0, 2] if step else [0, 1, 2, 3]
        assert computed == [len(live)]
        torch.testing.assert_close(got[live], want[live], atol=ATOL, rtol=0)
        if step:
            assert not got[[1, 3]].any()
    # a new session decodes every row again
    retiring.prefill(ids, mask)
    computed.clear()
    retiring.step(torch.tensor([1, 2, 3, 4]))
    assert computed == [4]


def test_kv_cache_sized_to_the_prompt_plus_the_new_tokens_reserved(tiny_pair, engine, monkeypatch):
    """A decoding session says how many tokens it will add (``reserve_new_tokens``, passed on by
    the proxy to its three sources): llama.cpp's rows then hold prompt + that, rounded to 256,
    instead of prompt + 512, and the decoding is the one it was."""
    from fedpt.models.llamacpp import LlamaCppLogitSource
    from fedpt.proxy import Decoding, ProxyTunedLM, TwoSourceDiff, decode

    tokenizer = tiny_pair[0]
    ids, mask = padded_batch(tokenizer, TEXTS)
    per_row, make = [], LlamaCppLogitSource._context

    def context(self, rows, length, room=None):
        handle = make(self, rows, length, room)
        per_row.append(self._ctx.per_row)
        return handle

    monkeypatch.setattr(LlamaCppLogitSource, "_context", context)
    decoding = Decoding(max_new_tokens=6)
    proxy = ProxyTunedLM(engine.source(), TwoSourceDiff(engine.source(), engine.source()), alpha=0.5)
    reserved = decode(proxy, ids, mask, [tokenizer.eos_token_id], tokenizer.pad_token_id, decoding)
    assert per_row == [256, 256, 256]  # longest prompt + 1 + 6 tokens, for all three sources

    per_row.clear()
    monkeypatch.setattr(LlamaCppLogitSource, "reserve_new_tokens", lambda self, count: None)
    proxy = ProxyTunedLM(engine.source(), TwoSourceDiff(engine.source(), engine.source()), alpha=0.5)
    unreserved = decode(proxy, ids, mask, [tokenizer.eos_token_id], tokenizer.pad_token_id, decoding)
    assert per_row == [768, 768, 768]  # the default: 512 tokens of room
    assert reserved == unreserved and any(reserved)


def rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fedpt_run_with_llamacpp_large_matches_the_local_run(local_fedpt_run, tmp_path, monkeypatch):
    """The same 2-round run with the proxy (large LM and the small LM's steering views) in torch
    and in llama.cpp: the devices' training is the same, and the proxy-tuned scores agree (greedy
    text can flip where logits nearly tie)."""
    import fedpt.models.llamacpp as llamacpp

    decoded, adapters = [], []  # proof that the large LM and the small LM's views really ran in llama.cpp
    real_decode, real_export = llamacpp.LlamaCppLogitSource._decode, llamacpp.export_lora_gguf
    monkeypatch.setattr(llamacpp.LlamaCppLogitSource, "_decode",
                        lambda self, *args: decoded.append(self.model.path.parent.name) or real_decode(self, *args))
    monkeypatch.setattr(llamacpp, "export_lora_gguf", lambda *args: adapters.append(1) or real_export(*args))
    engine_run = tmp_path / "llamacpp"
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(engine_run), *FEDPT_2_ROUNDS,
                 "--set", "model.large_backend=llamacpp", "--set", "model.small_proxy_backend=llamacpp"]) == 0
    assert {name.split("-v")[0] for name in decoded} == {"tiny-large", "tiny-small"}, set(decoded)
    assert adapters, "the round's adapter never reached llama.cpp"
    a, b = rounds(local_fedpt_run), rounds(engine_run)
    assert [r["round"] for r in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert (y["train_loss"] is None) == (x["train_loss"] is None)  # None: round 0 trains nothing
        if x["train_loss"] is not None:  # devices never see the large LM; the KD teacher's tokens can differ
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=0.05)
        assert y["rougeL_proxy"] == pytest.approx(x["rougeL_proxy"], abs=5.0)
    assert a[0]["rougeL_small"] == b[0]["rougeL_small"]  # before any distillation: the same small LM
    assert b[1]["kd_loss"] == pytest.approx(a[1]["kd_loss"], rel=0.05)


def test_config_and_bad_paths(tmp_path, monkeypatch):
    cfg = load_config(preset="tiny", overrides=["model.large_backend=llamacpp", "run.systems=['fedpt']"])
    assert cfg.model.large_backend == "llamacpp" and cfg.model.large_url == ""  # no service needed
    with pytest.raises(FedPTError, match="fedavg-large"):
        load_config(preset="tiny", overrides=["model.large_backend=llamacpp"])  # it trains the large LM

    from fedpt.models.llamacpp import LlamaCppModel, export_gguf

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(FedPTError, match="could not load"):
        LlamaCppModel(broken)
    other = tmp_path / "llama-dir"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FedPTError, match="qwen2 only"):
        export_gguf(other, other / "model.gguf")
    assert not (other / "model.gguf").exists()


def test_missing_bindings_is_one_clear_error(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    code = main(["run", "--preset", "tiny", "--no-progress", "--out", str(tmp_path / "run"), *FAST_TINY,
                 "--set", "run.systems=['fedpt']", "--set", "model.large_backend=llamacpp"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and "llama-cpp-python" in errors[0], errors


def test_auto_backend_picks_llamacpp_only_where_it_can_run(monkeypatch, tmp_path):
    import importlib.util

    auto = ["model.large_backend=auto"]
    assert load_config(preset="tiny", overrides=[*auto, "run.systems=['fedpt']"]).model.large_backend == "llamacpp"
    # fedavg-large trains the large LM: torch for every system of the run
    both = load_config(preset="tiny", overrides=[*auto, "run.systems=['fedpt','fedavg-large']"])
    assert both.model.large_backend == "local"
    # a plain model directory has no GGUF file to give llama.cpp
    plain = load_config(preset="tiny", overrides=[*auto, "run.systems=['fedpt']", f"model.large={tmp_path}"])
    assert plain.model.large_backend == "local"
    # what the run saves is the resolved backend, so a resume keeps it
    cfg = load_config(preset="tiny", overrides=[*auto, "run.systems=['fedpt']", "model.small_proxy_backend=auto"])
    assert cfg.model.small_proxy_backend == "llamacpp"
    cfg.save(tmp_path / "config.toml")
    assert load_config(path=tmp_path / "config.toml").model.large_backend == "llamacpp"
    assert load_config(path=tmp_path / "config.toml").model.small_proxy_backend == "llamacpp"
    assert load_config(preset="tiny", overrides=["model.small_proxy_backend=auto"]).model.small_proxy_backend == "torch"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    assert load_config(preset="tiny", overrides=[*auto, "run.systems=['fedpt']"]).model.large_backend == "local"


def test_small_lm_with_lora_adapter_in_llamacpp_equals_peft(tiny_pair, tiny_cfg, tmp_path):
    """The round's adapter exported to GGUF and applied by llama.cpp: the same tuned-minus-base
    logits as peft's (a nonzero adapter, so a wrong scale, sign or transposition shows)."""
    from fedpt.bench import with_random_lora
    from fedpt.models.llamacpp import LlamaCppAdapterDiff, LlamaCppModel, export_lora_gguf, gguf_path
    from fedpt.models.loading import load_model
    from fedpt.models.logits import MixedAdapterDiff

    tokenizer = tiny_pair[0]
    small = with_random_lora(load_model("tiny-small", "float32"), tiny_cfg.lora)
    engine = LlamaCppModel(gguf_path("tiny-small"), threads=1)
    diff = LlamaCppAdapterDiff(engine, engine.load_adapter(export_lora_gguf(small, tmp_path / "adapter.gguf")))
    reference = MixedAdapterDiff(small)
    ids, mask = padded_batch(tokenizer, TEXTS)
    expected = reference.prefill(ids, mask)
    assert expected.abs().max() > 0.05  # the adapter changes the logits noticeably
    torch.testing.assert_close(diff.prefill(ids, mask), expected, atol=ATOL / 4, rtol=0)
    tokens = torch.tensor([7, 70, 700])
    torch.testing.assert_close(diff.step(tokens), reference.step(tokens), atol=ATOL / 4, rtol=0)
    torch.testing.assert_close(diff.score(ids, mask, 3)[mask[:, -3:].bool()],
                               reference.score(ids, mask, 3)[mask[:, -3:].bool()], atol=ATOL / 4, rtol=0)


# -- llama.cpp on every CPU (issue 17) ----------------------------------------------------------

AMX_FLAGS = frozenset("avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8".split())
EPYC_FLAGS = frozenset("avx2 avx512f avx512_bf16".split())


def test_extra_buffers_are_off_on_amx_cpus_only_unless_forced(monkeypatch):
    """llama.cpp's AMX weight buffer segfaults on Sapphire Rapids with K-quants: "auto" keeps
    llama.cpp's extra (repacked) buffers everywhere else; on / off force the switch either way."""
    from fedpt.models.llamacpp import EXTRA_BUFFERS_ENV, extra_buffers_enabled

    monkeypatch.delenv(EXTRA_BUFFERS_ENV, raising=False)
    assert extra_buffers_enabled(flags=AMX_FLAGS) is False
    assert extra_buffers_enabled(flags=EPYC_FLAGS) is True
    assert extra_buffers_enabled(flags=frozenset({"avx2"})) is True
    assert extra_buffers_enabled("on", flags=AMX_FLAGS) is True
    assert extra_buffers_enabled("off", flags=EPYC_FLAGS) is False
    monkeypatch.setenv(EXTRA_BUFFERS_ENV, "OFF")
    assert extra_buffers_enabled(flags=EPYC_FLAGS) is False
    monkeypatch.setenv(EXTRA_BUFFERS_ENV, "maybe")
    with pytest.raises(FedPTError, match=f"{EXTRA_BUFFERS_ENV}='maybe': expected auto, on or off"):
        extra_buffers_enabled(flags=EPYC_FLAGS)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_both_buffer_settings_give_the_torch_logits(tiny_pair, tiny_large_gguf, monkeypatch, setting):
    """The switch the product uses on AMX CPUs, forced each way here: llama.cpp loads and computes
    the same logits as torch with and without its extra buffer types."""
    from fedpt.models.llamacpp import EXTRA_BUFFERS_ENV, LlamaCppModel

    monkeypatch.setenv(EXTRA_BUFFERS_ENV, setting)
    tokenizer, _, large = tiny_pair
    model = LlamaCppModel(tiny_large_gguf, threads=1)
    assert model.extra_buffers is (setting == "on")
    ids, mask = padded_batch(tokenizer, TEXTS)
    torch.testing.assert_close(model.source().score(ids, mask), LocalLogitSource(large).score(ids, mask),
                               atol=ATOL, rtol=0)


def test_a_llamacpp_crash_on_this_cpu_is_one_line_not_a_segfault(tiny_large_gguf, monkeypatch):
    """The check decodes in a child first: its SIGSEGV (injected, as the AMX kernel's) becomes one
    FedPTError naming the signal, the file and the CPU, and this process lives on."""
    from fedpt.cpu import cpu_summary
    from fedpt.models.llamacpp import EXTRA_BUFFERS_ENV, PROBE_FAULT_ENV, LlamaCppModel

    monkeypatch.setenv(PROBE_FAULT_ENV, "SIGSEGV")
    monkeypatch.setenv(EXTRA_BUFFERS_ENV, "on")
    with pytest.raises(FedPTError) as caught:
        LlamaCppModel(tiny_large_gguf, threads=1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"llama.cpp crashed (SIGSEGV) decoding {tiny_large_gguf.name} on this CPU "
                              f"({cpu_summary()})")
    assert f"{EXTRA_BUFFERS_ENV}=off" in message  # the switch that avoids the AMX buffer
    monkeypatch.setenv(PROBE_FAULT_ENV, "SIGILL")  # a build for another CPU
    monkeypatch.setenv(EXTRA_BUFFERS_ENV, "off")
    with pytest.raises(FedPTError, match=r"crashed \(SIGILL\).*model.large_backend = 'local'") as caught:
        LlamaCppModel(tiny_large_gguf, threads=1)
    assert EXTRA_BUFFERS_ENV not in str(caught.value)  # already off: nothing to suggest there
    monkeypatch.delenv(PROBE_FAULT_ENV)
    LlamaCppModel(tiny_large_gguf, threads=1).close()  # without the fault the same file loads


def test_auto_falls_back_to_torch_where_llamacpp_crashes(tmp_path, monkeypatch, capsys):
    """``auto`` chose llama.cpp; its check crashes on this CPU: the run goes on in torch, says why in
    one line, and its config.toml records torch. Asked for by name, the same crash refuses the run."""
    from fedpt.models.llamacpp import PROBE_FAULT_ENV

    monkeypatch.setenv(PROBE_FAULT_ENV, "SIGSEGV")
    out = tmp_path / "auto"
    args = ["run", "--preset", "tiny", "--no-progress", *FAST_TINY, "--set", "run.systems=['fedpt']",
            "--set", "federation.rounds=1", "--set", "model.small_proxy_backend=auto"]
    assert main([*args, "--out", str(out), "--set", "model.large_backend=auto"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: 'auto' runs the models in torch, not llama.cpp: "
                                                   "llama.cpp crashed (SIGSEGV)"), notes
    saved = load_config(path=out / "config.toml")
    assert (saved.model.large_backend, saved.model.small_proxy_backend) == ("local", "torch")
    named = tmp_path / "named"
    assert main([*args, "--out", str(named), "--set", "model.large_backend=llamacpp"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: llama.cpp crashed (SIGSEGV)"), errors
    assert not named.exists()  # refused before anything was written


# -- one evaluation engine for every model (issue 19) ---------------------------------------------


def test_large_lm_with_lora_adapter_in_llamacpp_equals_peft(tiny_pair, tiny_cfg, tmp_path):
    """fedavg-large's tuned large LM as llama.cpp evaluates it (the large GGUF plus the adapter
    exported to GGUF) gives peft's logits, for a nonzero adapter whose effect is far above the
    tolerance (a doubled alpha, a sign or a transposition fails it)."""
    from fedpt.bench import with_random_lora
    from fedpt.models.llamacpp import LlamaCppModel, export_lora_gguf, gguf_path
    from fedpt.models.loading import load_model

    tokenizer = tiny_pair[0]
    large = with_random_lora(load_model("tiny-large", "float32"), tiny_cfg.lora, scale=0.05)
    engine = LlamaCppModel(gguf_path("tiny-large"), threads=1)
    tuned = engine.source(engine.load_adapter(export_lora_gguf(large, tmp_path / "large-adapter.gguf")))
    ids, mask = padded_batch(tokenizer, TEXTS)
    expected = LocalLogitSource(large).score(ids, mask)  # peft, adapter on
    base = LocalLogitSource(large, use_adapter=False).score(ids, mask)
    real = mask.bool()
    assert (expected - base)[real].abs().max() > 10 * ATOL  # the adapter moves the logits well past the tolerance
    torch.testing.assert_close(tuned.score(ids, mask)[real], expected[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(tuned.prefill(ids, mask), expected[:, -1], atol=ATOL, rtol=0)


def test_eval_engine_config(monkeypatch):
    """llamacpp: every evaluated model in llama.cpp (both backends follow), fedavg-large allowed
    (it trains in torch); a service-backed large LM is refused; auto picks torch on AMX CPUs only."""
    import fedpt.cpu as cpu

    cfg = load_config(preset="tiny", overrides=["model.eval_engine=llamacpp", "run.systems=['fedpt','fedavg-large']"])
    assert (cfg.model.large_backend, cfg.model.small_proxy_backend) == ("llamacpp", "llamacpp")
    with pytest.raises(FedPTError, match="use model.eval_engine = 'torch'"):
        load_config(preset="tiny", overrides=["model.eval_engine=llamacpp", "model.large_backend=remote",
                                              "model.large_url=http://127.0.0.1:1"])
    with pytest.raises(FedPTError, match="fedavg-large tunes the large LM's weights"):
        load_config(preset="tiny", overrides=["model.large_backend=llamacpp", "run.systems=['fedavg-large']"])
    auto = ["model.eval_engine=auto", "model.large_backend=auto", "model.small_proxy_backend=auto"]
    for flags, engine, large in ((EPYC_FLAGS, "llamacpp", "llamacpp"), (AMX_FLAGS, "torch", "local")):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        cfg = load_config(preset="tiny", overrides=[*auto, "run.systems=['fedpt','fedavg-large']"])
        assert (cfg.model.eval_engine, cfg.model.large_backend) == (engine, large), flags
    monkeypatch.setattr(cpu, "cpu_flags", lambda: EPYC_FLAGS)
    pinned = load_config(preset="tiny", overrides=["model.eval_engine=auto", "model.large_backend=local"])
    assert pinned.model.eval_engine == "torch"  # a large LM pinned to torch keeps evaluation in torch


@pytest.mark.slow
def test_fedavg_large_and_fedpt_evaluated_in_llamacpp(tmp_path, monkeypatch):
    """A run of fedpt and fedavg-large with model.eval_engine = llamacpp: fedavg-large trains in
    torch and its tuned large LM is scored through llama.cpp with its adapter; every evaluated model
    ran there (none in torch); config.toml and summary.json say which engine judged what."""
    import fedpt.models.llamacpp as llamacpp
    from fedpt.models.logits import LocalLogitSource as Local

    decoded, adapters, torch_scored = [], [], []
    real_decode, real_export = llamacpp.LlamaCppLogitSource._decode, llamacpp.export_lora_gguf
    monkeypatch.setattr(llamacpp.LlamaCppLogitSource, "_decode",
                        lambda self, *args: decoded.append(self.model.path.parent.name) or real_decode(self, *args))
    monkeypatch.setattr(llamacpp, "export_lora_gguf",
                        lambda model, out: adapters.append(model.get_base_model().config.hidden_size)
                        or real_export(model, out))
    real_prefill = Local.prefill
    monkeypatch.setattr(Local, "prefill", lambda self, *a: torch_scored.append(1) or real_prefill(self, *a))
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST_TINY,
                 "--set", "run.systems=['fedpt','fedavg-large']", "--set", "federation.rounds=1",
                 "--set", "model.eval_engine=llamacpp"]) == 0
    assert not torch_scored, "an evaluated model was decoded in torch"
    assert {name.split("-v")[0] for name in decoded} == {"tiny-large", "tiny-small"}
    assert len(set(adapters)) == 2, "both the small and the large LM's adapters went to llama.cpp"
    saved = load_config(path=out / "config.toml").model
    assert (saved.eval_engine, saved.large_backend, saved.small_proxy_backend) == ("llamacpp",) * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engines"]["large (tuned by fedavg-large)"] == "llama.cpp"
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    large = [r for r in rows if r["system"] == "fedavg-large" and r["round"] == 1]
    assert large and large[0]["rougeL_large"] is not None and large[0]["clients"] > 0
    # `fedpt eval` judges the run's models in the run's engine: the run's own scores, none in torch.
    assert main(["eval", "--run", str(out), "--name", "again", "--no-progress"]) == 0
    assert not torch_scored, "fedpt eval decoded a model of a llama.cpp-evaluated run in torch"
    again = json.loads((out / "evals" / "again" / "summary.json").read_text())
    for system in ("fedpt", "fedavg-large"):
        for stage in ("pretrained", "final"):
            scored = summary["systems"][system][stage]["rougeL_sets"]  # (eval adds the pretrained pair everywhere)
            assert {s: {m: again["systems"][system][stage]["rougeL_sets"][s][m] for m in models}
                    for s, models in scored.items()} == scored, (system, stage)
    # asked for the pretrained pair only, it loads no torch copy of the large LM for fedavg-large's adapter
    import fedpt.models.loading as loading

    loaded, real_load = [], loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, *a: loaded.append(spec) or real_load(spec, *a))
    assert main(["eval", "--run", str(out), "--name", "pretrained", "--no-progress",
                 "--model", "pretrained-small", "--model", "pretrained-large"]) == 0
    assert "tiny-large" not in loaded
    pretrained = json.loads((out / "evals" / "pretrained" / "summary.json").read_text())
    assert (pretrained["systems"]["fedavg-large"]["pretrained"]["rougeL_sets"]
            == again["systems"]["fedavg-large"]["pretrained"]["rougeL_sets"])
