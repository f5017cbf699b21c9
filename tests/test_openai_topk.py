"""The top-k black-box backend against a real ``fedpt serve --model tiny-large`` process on 127.0.0.1.

Every comparison is against an independent computation: the tiny large model run locally with
plain Hugging Face calls (log-softmax, top-k), not the code path under test.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys

import pytest
import torch

from fedpt.data.prompts import encode_prompts_left
from fedpt.errors import FedPTError
from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff
from fedpt.models.lora import attach_lora
from fedpt.models.openai_topk import OpenAITopKSource, TopKRestricted
from fedpt.proxy import Decoding, ProxyTunedLM, decode, stop_token_ids
from fedpt.serving.launch import launch

from .conftest import FAST

PROMPTS = ["### Instruction:\nName a fruit.\n\n### Response:\n", "Tell me about the sun and the moon, please."]
API_KEY = "test-key-topk"


@pytest.fixture(scope="module")
def server(fedpt_home, tmp_path_factory):
    """A real ``fedpt serve --model tiny-large`` (fp32, API key, k up to the whole vocabulary)."""
    folder = tmp_path_factory.mktemp("serve")
    key_file = folder / "key"
    key_file.write_text(API_KEY + "\n")
    with launch(["--model", "tiny-large", "--api-key-file", str(key_file), "--dtype", "float32",
                 "--max-logprobs", "4096", "--threads", "1"], log=folder / "serve.log") as served:
        yield {"url": served.url + "/v1", "key_file": str(key_file)}


def _source(server, tokenizer, k: int, **kwargs) -> OpenAITopKSource:
    return OpenAITopKSource(server["url"], "", k, tokenizer, len(tokenizer), api_key=API_KEY, **kwargs)


def _local_topk(large, sequence: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent: top-k of the local model's log-softmax at every position of one sequence."""
    with torch.no_grad():
        logprobs = torch.log_softmax(large(input_ids=torch.tensor([sequence])).logits[0].float(), dim=-1)
    return logprobs.topk(k, dim=-1)


def test_api_topk_equals_local_log_softmax_topk(server, tiny_pair):
    tokenizer, _, large = tiny_pair
    k = 8
    source = _source(server, tokenizer, k)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    got = source.prefill(ids, mask)  # (B, V): k finite entries per row
    assert source.token_ids_extension is True  # fedpt serve honours return_tokens_as_token_ids
    for row, (prompt_ids, prompt_mask) in enumerate(zip(ids, mask)):
        values, top = _local_topk(large, prompt_ids[prompt_mask.bool()].tolist(), k)
        finite = torch.isfinite(got[row])
        assert int(finite.sum()) == k
        assert set(finite.nonzero()[:, 0].tolist()) == set(top[-1].tolist())
        assert torch.allclose(got[row, top[-1]], values[-1], atol=1e-4)
    # step() resends the grown sequence; the next distribution matches the local one there too.
    nxt = got.argmax(-1)
    after = source.step(nxt)
    for row, (prompt_ids, prompt_mask) in enumerate(zip(ids, mask)):
        values, top = _local_topk(large, prompt_ids[prompt_mask.bool()].tolist() + [int(nxt[row])], k)
        assert torch.allclose(after[row, top[-1]], values[-1], atol=1e-4)
    # Whole-sequence scoring (echo) on the left-padded batch: the last K positions.
    scored = source.score(ids, mask, keep_last=5)
    for row, (prompt_ids, prompt_mask) in enumerate(zip(ids, mask)):
        values, top = _local_topk(large, prompt_ids[prompt_mask.bool()].tolist(), k)
        for j in range(5):
            assert set(torch.isfinite(scored[row, j]).nonzero()[:, 0].tolist()) == set(top[-5 + j].tolist())
            assert torch.allclose(scored[row, j, top[-5 + j]], values[-5 + j], atol=1e-4)
    # fedpt serve takes batches of token ids and echoes OpenAI's way (entry j: the distribution of
    # token j, the generated token last), as the backend learnt from its first two requests.
    traits = source.traits
    assert (traits.id_prompts, traits.batch, traits.echo_generated, traits.echo_offset) == (True, True, True, 1)
    assert source.stats.unmapped == 0 and source.stats.requests == 2 + 3 and source.stats.refetched == 0


def test_text_prompts_give_the_same_topk_as_token_ids(server, tiny_pair):
    """As with a server that speaks only text (``id_prompts=False``): rows go as their decoded text,
    still batched, and fedpt serve tokenizes the text back into our ids; prefill and echo scoring
    equal the local model's top-k exactly as with token-id prompts."""
    tokenizer, _, large = tiny_pair
    k = 8
    source = _source(server, tokenizer, k, id_prompts=False)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    got, scored = source.prefill(ids, mask), source.score(ids, mask, keep_last=5)
    for row, (prompt_ids, prompt_mask) in enumerate(zip(ids, mask)):
        values, top = _local_topk(large, prompt_ids[prompt_mask.bool()].tolist(), k)
        for j, position in ((None, -1), *((j, -5 + j) for j in range(5))):
            answer = got[row] if j is None else scored[row, j]
            assert set(torch.isfinite(answer).nonzero()[:, 0].tolist()) == set(top[position].tolist())
            assert torch.allclose(answer[top[position]], values[position], atol=1e-4)
    traits = source.traits
    assert (traits.id_prompts, traits.batch, traits.echo_generated, traits.echo_offset) == (False, True, True, 1)
    assert (source.stats.retokenized, source.stats.refetched, source.stats.unmapped) == (0, 0, 0)


@pytest.fixture(scope="module")
def tuned_small(tiny_pair, tiny_cfg):
    """A non-trivial adapter (tuned != base) on the tiny small model."""
    import copy

    peft = attach_lora(copy.deepcopy(tiny_pair[1]), tiny_cfg.lora, seed=0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return peft


def _greedy(source, tokenizer, tokens: int = 10) -> list[list[int]]:
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    return decode(source, ids, mask, stop_token_ids(tokenizer), tokenizer.pad_token_id, Decoding(max_new_tokens=tokens))


def test_full_vocabulary_k_equals_full_logits_proxy_tuning(server, tiny_pair, tuned_small):
    tokenizer, _, large = tiny_pair
    full = _greedy(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(tuned_small), 1.0), tokenizer)
    api = _greedy(ProxyTunedLM(_source(server, tokenizer, len(tokenizer)), MixedAdapterDiff(tuned_small), 1.0),
                  tokenizer)
    assert api == full


def test_small_k_proxy_picks_only_large_topk_tokens(server, tiny_pair, tuned_small):
    tokenizer, _, large = tiny_pair
    k = 3
    api = _greedy(ProxyTunedLM(_source(server, tokenizer, k), MixedAdapterDiff(tuned_small), 1.0), tokenizer)
    full = _greedy(ProxyTunedLM(LocalLogitSource(large), MixedAdapterDiff(tuned_small), 1.0), tokenizer)
    assert api != full  # with k = 3 the restriction changes the output (else this test shows nothing)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    for row, prompt_ids, prompt_mask in zip(api, ids, mask):
        sequence = prompt_ids[prompt_mask.bool()].tolist() + row
        _, top = _local_topk(large, sequence, k)
        assert all(token in top[-len(row) - 1 + i].tolist() for i, token in enumerate(row))
    # and equals the offline restriction of the local model's logits
    offline = _greedy(ProxyTunedLM(TopKRestricted(LocalLogitSource(large), k), MixedAdapterDiff(tuned_small), 1.0),
                      tokenizer)
    assert api == offline


def test_byte_level_mapping_without_token_ids_counts_what_it_drops(server, tiny_pair):
    """Asked without return_tokens_as_token_ids, fedpt serve returns token strings: partial UTF-8
    tokens print as U+FFFD, cannot be mapped back, and are counted."""
    tokenizer, _, large = tiny_pair
    k = len(tokenizer)  # every token, so the 130 unmappable ones are among them
    source = _source(server, tokenizer, k, token_ids=False)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS[:1], 64)
    got = source.prefill(ids, mask)
    values, top = _local_topk(large, ids[0][mask[0].bool()].tolist(), k)
    printable = [i for i in top[-1].tolist() if "\ufffd" not in tokenizer.decode([i])]
    assert set(torch.isfinite(got[0]).nonzero()[:, 0].tolist()) == set(printable)
    assert source.stats.unmapped + source.stats.collapsed == k - len(printable)
    assert source.stats.unmapped > 0


@pytest.mark.slow
def test_fedpt_run_with_the_openai_backend_completes(server, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fedpt.cli", "run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST,
         "--set", "federation.rounds=1", "--set", "run.systems=['fedpt']", "--set", "model.large_backend=openai", "--set",
         f"model.large_url={server['url']}", "--set", f"model.large_api_key_file={server['key_file']}",
         "--set", "model.large_topk=5"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-6000:]
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["round"] == 1 and final["system"] == "fedpt"
    # The proxy's Rouge-L is what its written predictions score, recomputed here with rouge_score
    # itself (best F-measure over the references, x100, mean over prompts, then over seeds).
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for set_name, by_model in final["rougeL_sets"].items():
        rows = [json.loads(line) for line in
                (out / "fedpt" / "predictions" / f"round-0001.{set_name}.proxy.jsonl").read_text().splitlines()]
        per_seed: dict = {}
        for row in rows:
            best = max(scorer.score(ref, row["prediction"])["rougeL"].fmeasure for ref in row["references"])
            per_seed.setdefault(row["seed"], []).append(100.0 * best)
        assert rows and by_model["proxy"] == pytest.approx(
            sum(sum(v) / len(v) for v in per_seed.values()) / len(per_seed), abs=1e-9)
    assert final["rougeL_proxy"] == next(iter(final["rougeL_sets"].values()))["proxy"]
    # Distillation from the top-5 teacher: a KL over the teacher's support is finite (0 * log 0 = 0
    # off the support, not 0 * -inf = NaN) and >= 0 (Gibbs), before and after; so is the loss.
    for key in ("kd_kl_before", "kd_kl_after", "kd_loss"):
        assert math.isfinite(final[key]) and final[key] >= 0, (key, final[key])


def test_bad_paths_give_one_line(server, tiny_pair, tmp_path):
    tokenizer = tiny_pair[0]
    with pytest.raises(FedPTError, match="refused the API key"):
        OpenAITopKSource(server["url"], "", 5, tokenizer, len(tokenizer), api_key="wrong")
    with socket.socket() as unused:  # bound, never listening: connections are refused, nobody else gets it
        unused.bind(("127.0.0.1", 0))
        with pytest.raises(FedPTError, match="cannot reach the large LM"):
            OpenAITopKSource(f"http://127.0.0.1:{unused.getsockname()[1]}/v1", "", 5, tokenizer, len(tokenizer),
                             retries=1)
    # Through the CLI: one line on stderr, exit status 2, no traceback.
    result = subprocess.run(
        [sys.executable, "-m", "fedpt.cli", "run", "--preset", "tiny", "--no-progress", "--out",
         str(tmp_path / "bad"), "--set", "run.systems=['fedpt']", "--set", "model.large_backend=openai", "--set",
         f"model.large_url={server['url']}",
         "--set", f"model.large_api_key_file={tmp_path / 'missing-key'}"], capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "API key file" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_steps_with_full_vocabulary_k_equal_the_local_ones(server, fedpt_home):
    """In-process, no Flower: FedPT's proxy-tuning, evaluation and distillation with
    ``large_backend = "openai"`` and k = the whole vocabulary equal those with the large LM in-process
    (the API's log-probabilities differ from logits by a per-position constant that softmax cancels);
    with k = 5 the distillation is still finite (the top-k KD loss over the teacher's support)."""
    from fedpt.config import load_config
    from fedpt.server import ServerModels, load_splits

    overrides = ["data.eval_size=8", "data.kd_pool_size=8", "eval.max_new_tokens=8", "distill.max_new_tokens=8",
                 "distill.steps=2", "run.systems=['fedpt']", "model.dtype=float32"]
    openai = [f"model.large_url={server['url']}", f"model.large_api_key_file={server['key_file']}",
              "model.large_backend=openai"]
    configs = [load_config(preset="tiny", overrides=overrides),
               load_config(preset="tiny", overrides=[*overrides, *openai, "model.large_topk=4096"]),
               load_config(preset="tiny", overrides=[*overrides, *openai, "model.large_topk=5"])]
    results = []
    for cfg in configs:
        server_models = ServerModels.load(cfg, load_splits(cfg), large_trainable=False)
        assert (server_models.large is None) == (cfg.model.large_backend == "openai")
        generator = torch.Generator().manual_seed(0)
        adapter = {k: torch.randn(v.shape, generator=generator) * 0.05
                   for k, v in server_models.initial["small"].items()}
        server_models.load_adapter("small", adapter)
        before = server_models.evaluate(server_models.proxy_tune())
        distilled = server_models.distill(server_round=1)
        results.append((before, distilled, server_models.adapter_state("small")))
    (eval_a, kd_a, state_a), (eval_b, kd_b, state_b), (_, kd_k5, state_k5) = results
    assert {k: (v.rouge_l, v.samples) for k, v in eval_a.items()} == {k: (v.rouge_l, v.samples) for k, v in eval_b.items()}
    assert kd_b.loss == pytest.approx(kd_a.loss, rel=1e-4) and kd_b.kl_before == pytest.approx(kd_a.kl_before, rel=1e-4)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], atol=1e-5, rtol=1e-4)
    assert math.isfinite(kd_k5.loss) and math.isfinite(kd_k5.kl_after) and kd_k5.loss != pytest.approx(kd_a.loss)
    assert all(torch.isfinite(v).all() for v in state_k5.values())
