"""FedPT's top-k backend (``model.large_backend = "openai"``) against llama-cpp-python's own
OpenAI-compatible server (``python -m llama_cpp.server``) serving the tiny large model's GGUF.

That server speaks only text: one text prompt per request (token ids or a list of prompts get
HTTP 500), and its echo holds the prompt's tokens only, entry j holding the distribution *after*
token j (entry 0 null). Every comparison is against the tiny large model run locally in torch
(log-softmax, top-k), not against the code under test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server not installed "
                    "(pip install 'fedpt[llamacpp]': llama-cpp-python[server])")

from fedpt.data.prompts import encode_prompts_left  # noqa: E402
from fedpt.errors import FedPTError  # noqa: E402
from fedpt.models.logits import LocalLogitSource, MixedAdapterDiff  # noqa: E402
from fedpt.models.openai_topk import CALIBRATION_PROBE, OpenAITopKSource, TopKRestricted  # noqa: E402
from fedpt.proxy import Decoding, ProxyTunedLM, decode, stop_token_ids  # noqa: E402
from fedpt.serving.launch import launch_llama_cpp_server  # noqa: E402

from .test_openai_topk import tuned_small  # noqa: E402,F401  (the same non-trivial adapter fixture)

# llama.cpp runs the f32 GGUF in its own kernels with an f16 KV cache: its log-probabilities agree
# with torch's fp32 to a few thousandths on these models (tests/test_llamacpp.py), not bit for bit.
ATOL = 2e-2
PROMPTS = ["### Instruction:\nName a fruit.\n\n### Response:\n", "Tell me about the sun and the moon, please."]


@pytest.fixture(scope="module")
def llama_server(fedpt_home, tmp_path_factory):
    """``python -m llama_cpp.server`` on 127.0.0.1 (a free port) with the tiny large model exported
    to GGUF by FedPT's own export; stopped (its whole process group) when the module is done."""
    from fedpt.models.llamacpp import gguf_path

    server = launch_llama_cpp_server(gguf_path("tiny-large"), threads=1,
                                     log=tmp_path_factory.mktemp("llama-server") / "server.log", timeout=120)
    try:
        yield server.url + "/v1"
    finally:
        server.stop()


def _local_logprobs(large, sequence: list[int]) -> torch.Tensor:
    """Independent: the local model's log-softmax at every position of one sequence, (T, V)."""
    with torch.no_grad():
        return torch.log_softmax(large(input_ids=torch.tensor([sequence])).logits[0].float(), dim=-1)


def _assert_topk(got: torch.Tensor, local: torch.Tensor, k: int) -> None:
    """``got`` (V,) holds k finite log-probs: a top-k of ``local`` (V,) up to llama.cpp's rounding
    (ties within 2·ATOL may swap at the k-th place), each equal to the local value within ATOL."""
    ids = torch.isfinite(got).nonzero()[:, 0]
    assert len(ids) == k
    kth = local.topk(k).values[-1]
    assert bool((local[ids] >= kth - 2 * ATOL).all()), (ids.tolist(), local.topk(k).indices.tolist())
    torch.testing.assert_close(got[ids], local[ids], atol=ATOL, rtol=0)


def test_topk_backend_reads_the_text_only_server_as_the_local_model(llama_server, tiny_pair):
    """The issue's case: same model, same tokenizer behind llama-cpp-python's server. The start-up
    check passes, and prefill, step and echo scoring (every position of a left-padded batch, the
    first one included, which that server's echo never holds) equal the local top-k."""
    from fedpt.models.loading import PROBE_STRINGS

    tokenizer, _, large = tiny_pair
    k = 8
    source = OpenAITopKSource(llama_server, "", k, tokenizer, len(tokenizer))
    source.check_vocabulary(PROBE_STRINGS)  # was: exit 2, "tokenizes ... differently"
    assert (source.traits.id_prompts, source.traits.echo_generated, source.traits.echo_offset) == (False, False, 0)
    ids, mask = encode_prompts_left(tokenizer, PROMPTS, 64)
    rows = [prompt_ids[prompt_mask.bool()].tolist() for prompt_ids, prompt_mask in zip(ids, mask)]
    got = source.prefill(ids, mask)
    assert source.traits.batch is False  # two prompts in one request: HTTP 500, so one request per row
    for row, sequence in enumerate(rows):
        _assert_topk(got[row], _local_logprobs(large, sequence)[-1], k)
    nxt = got.argmax(-1)
    after = source.step(nxt)
    for row, sequence in enumerate(rows):
        _assert_topk(after[row], _local_logprobs(large, sequence + [int(nxt[row])])[-1], k)
    scored = source.score(ids, mask)  # keep_last = 0: every column of the padded batch
    for row, sequence in enumerate(rows):
        local = _local_logprobs(large, sequence)
        start = ids.shape[1] - len(sequence)
        for t in range(len(sequence)):
            _assert_topk(scored[row, start + t], local[t], k)
        assert not torch.isfinite(scored[row, :start]).any()  # padding columns stay empty
    assert source.stats.refetched == len(rows)  # position 0 of each row, asked for on its own
    assert (source.stats.unmapped, source.stats.retokenized) == (0, 0)




class TextOnlyTopK:
    """Independent reference for a text-only top-k server: the local model's top-k log-probs after
    the text of each row *as the tokenizer splits it* (what a server given text conditions on), not
    after our ids. ``retokenized`` counts the steps where the two differ."""

    def __init__(self, large, tokenizer, k: int) -> None:
        self.large, self.tokenizer, self.k, self.retokenized = large, tokenizer, k, 0

    def _next(self) -> torch.Tensor:
        out = torch.full((len(self.rows), len(self.tokenizer)), -torch.inf)
        for i, row in enumerate(self.rows):
            split = self.tokenizer(self.tokenizer.decode(row), add_special_tokens=False)["input_ids"]
            self.retokenized += split != row
            values, top = _local_logprobs(self.large, split)[-1].topk(self.k)
            out[i, top] = values
        return out

    def prefill(self, input_ids, attention_mask):
        self.rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        return self._next()

    def step(self, tokens):
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
        return self._next()


def test_proxy_decoding_through_the_server_equals_a_text_only_topk_reference(llama_server, tiny_pair, tuned_small):
    """Proxy-tuned greedy decoding with the large LM behind llama-cpp-python's server (k = 3) gives
    the tokens of the same proxy over the local model's top-3 after each row's text. Along the way
    the proxy generates splits BPE would not make ('et' + 's'): the server sees 'ets', as the
    reference does, and the backend counts exactly those steps. Greedy tokens are discrete: they
    agree unless two candidates' proxy scores lie within llama.cpp's rounding (ATOL) of each other."""
    tokenizer, _, large = tiny_pair
    k, ids, mask = 3, *encode_prompts_left(tokenizer, PROMPTS, 64)

    def greedy(large_source):
        return decode(ProxyTunedLM(large_source, MixedAdapterDiff(tuned_small), 1.0), ids, mask,
                      stop_token_ids(tokenizer), tokenizer.pad_token_id, Decoding(max_new_tokens=10))

    source, reference = OpenAITopKSource(llama_server, "", k, tokenizer, len(tokenizer)), TextOnlyTopK(large, tokenizer, k)
    api = greedy(source)
    assert api == greedy(reference)
    assert source.stats.retokenized == reference.retokenized > 0  # every such step, none else
    assert source.stats.unmapped == 0
    # With token ids (no re-splitting) the proxy decodes otherwise here: the text path was exercised.
    assert api != greedy(TopKRestricted(LocalLogitSource(large), k))


def _non_canonical_pair(tokenizer, row: list[int]) -> int:
    """A token x such that the text of row + [x] is tokenized differently (BPE merges it with row's
    last token): what a proxy may generate, and what a text-only server then splits its own way."""
    for x in range(len(tokenizer)):
        text = tokenizer.decode(row + [x])
        if "\ufffd" not in text and tokenizer(text, add_special_tokens=False)["input_ids"] != row + [x]:
            return x
    raise AssertionError("no token re-merges with the row")


def test_a_text_prompt_the_server_splits_otherwise_is_named_and_counted(llama_server, tiny_pair, capsys):
    """Decoding appends a token BPE would merge with the previous one; the server gets the text and
    tokenizes it its own (canonical) way. One warning line names the first differing position, the
    step is counted, and the answer is the local model's distribution on the server's split."""
    tokenizer, _, large = tiny_pair
    source = OpenAITopKSource(llama_server, "", 5, tokenizer, len(tokenizer))
    ids, mask = encode_prompts_left(tokenizer, PROMPTS[1:], 64)
    row = ids[0][mask[0].bool()].tolist()
    source.prefill(ids, mask)
    assert source.stats.retokenized == 0
    x = _non_canonical_pair(tokenizer, row)
    ours = row + [x]
    theirs = tokenizer(tokenizer.decode(ours), add_special_tokens=False)["input_ids"]
    first = next(t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    got = source.step(torch.tensor([x]))
    assert source.stats.retokenized == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "other tokens than ours" in line]
    assert len(lines) == 1
    assert f"token {first} of {len(ours)} (ours) / {len(theirs)} (theirs)" in lines[0]
    assert f"ours {tokenizer.decode([ours[first]])!r} (id {ours[first]})" in lines[0]
    assert f"theirs {tokenizer.decode([theirs[first]])!r} (id {theirs[first]})" in lines[0]
    _assert_topk(got[0], _local_logprobs(large, theirs)[-1], 5)


def _merges(tokenizer) -> list[list[str]]:
    import json

    return [m if isinstance(m, list) else m.split(" ")
            for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]


def _without_merge(tokenizer, left: str, right: str):
    """Our tokenizer with one BPE merge removed: a split the server (the original GGUF) does not share."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = [m for m in merges if (m if isinstance(m, list) else m.split(" ")) != [left, right]]
    assert len(spec["model"]["merges"]) == len(merges) - 1
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)


def test_a_server_splitting_a_prompt_otherwise_is_caught_by_its_token_count(llama_server, tiny_pair, capsys):
    """Our tokenizer lacks one merge the server's has, in a word of the prompt but not of the start-up
    probe: the start-up check passes, the server's usage.prompt_tokens for the prompt differs from
    our count, and an echo names the first differing token in one line. The answer is the local
    model's distribution on the server's split."""
    tokenizer, _, large = tiny_pair
    prompt, probe_ids = PROMPTS[1], tokenizer(CALIBRATION_PROBE, add_special_tokens=False)["input_ids"]
    theirs = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    names = set(tokenizer.convert_ids_to_tokens(theirs)) - set(tokenizer.convert_ids_to_tokens(probe_ids))
    for left, right in (m for m in _merges(tokenizer) if "".join(m) in names):
        ours_tokenizer = _without_merge(tokenizer, left, right)
        ours = ours_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if ours != theirs and ours_tokenizer(CALIBRATION_PROBE, add_special_tokens=False)["input_ids"] == probe_ids:
            break
    else:
        raise AssertionError("no merge of the prompt's words leaves the probe's split alone")
    first = next(t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    source = OpenAITopKSource(llama_server, "", 5, ours_tokenizer, len(tokenizer))
    got = source.prefill(*encode_prompts_left(ours_tokenizer, [prompt], 64))
    assert source.stats.retokenized == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "other tokens than ours" in line]
    assert len(lines) == 1
    assert (f"token {first} of {len(ours)} (ours) / {len(theirs)} (theirs): ours {tokenizer.decode([ours[first]])!r} "
            f"(id {ours[first]}), theirs {tokenizer.decode([theirs[first]])!r} (id {theirs[first]})") in lines[0]
    _assert_topk(got[0], _local_logprobs(large, theirs)[-1], 5)


def test_a_different_tokenization_is_one_line_naming_the_first_difference(llama_server, tiny_pair):
    """Our tokenizer without the merge 'e'+'l' splits 'Below' as B|e|l|ow; the server (the real
    GGUF) as B|el|ow. The error names that position, our token and theirs, on one line."""
    tokenizer = tiny_pair[0]
    ours_tokenizer = _without_merge(tokenizer, "e", "l")
    ours = ours_tokenizer(CALIBRATION_PROBE, add_special_tokens=False)["input_ids"]
    theirs = tokenizer(CALIBRATION_PROBE, add_special_tokens=False)["input_ids"]
    first = next(t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    source = OpenAITopKSource(llama_server, "", 5, ours_tokenizer, len(tokenizer))
    with pytest.raises(FedPTError) as caught:
        source.check_vocabulary((CALIBRATION_PROBE,))
    message = str(caught.value)
    assert "\n" not in message and "family" not in message
    assert (f"token {first} of {len(ours)} (ours) / {len(theirs)} (theirs): ours {tokenizer.decode([ours[first]])!r} "
            f"(id {ours[first]}), theirs {tokenizer.decode([theirs[first]])!r} (id {theirs[first]})") in message
