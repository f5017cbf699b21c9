"""The Rouge-L protocol: hand-checked values, and ``evaluate_rouge`` against an independent scorer.

The oracle below is written from the protocol's definition (MiniLLM/DistiLLM, rouge-score's
``rougeL``), not from fedpt's code: lower-case, split on non-alphanumerics, Porter-stem words
longer than 3 characters, LCS over tokens, F = 2PR / (P + R); max over a prompt's references,
x100, mean over prompts, mean over seeds.
"""

from dataclasses import replace
import re

import pytest
from nltk.stem.porter import PorterStemmer

from fedpt.config import EvalConfig
from fedpt.data.prompts import format_prompt
from fedpt.data.records import Example
from fedpt.evaluate import evaluate_rouge, rouge_l
from fedpt.models.logits import LocalLogitSource
from fedpt.proxy import Decoding, generate_ids

_STEMMER = PorterStemmer()


def _tokens(text: str) -> list[str]:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return [_STEMMER.stem(w) if len(w) > 3 else w for w in words]


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal, row[0] = 0, 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _oracle_f(prediction: str, reference: str) -> float:
    pred, ref = _tokens(prediction), _tokens(reference)
    common = _lcs(pred, ref) if pred and ref else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_lcs_oracle_on_paper():
    assert _lcs("a b c d".split(), "b d c".split()) == 2  # "b c" or "b d"
    assert _tokens("The dogs were RUNNING!") == ["the", "dog", "were", "run"]


def test_rouge_l_hand_checked_values():
    # Identical up to case and punctuation: LCS = 3 of 3 -> P = R = 1 -> 100 (x100, not 1.0).
    assert rouge_l("The cat, sat!", ["the cat sat"]) == pytest.approx(100.0)
    # pred [the cat sat on the mat] vs ref [the cat is on the mat]: LCS "the cat on the mat" = 5,
    # P = 5/6, R = 5/6, F = 5/6 = 83.333...
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    # Stemming: pred [the dog were run] ("dogs"->dog, "running"->run; "were" stays), ref [a dog run]
    # ("runs"->run): LCS "dog run" = 2, P = 2/4, R = 2/3, F = 2*(1/2)*(2/3) / (1/2 + 2/3) = 4/7 = 57.142...
    # Without stemming no token matches and the score is 0.
    assert rouge_l("The dogs were running", ["a dog runs"]) == pytest.approx(400 / 7)
    assert rouge_l("running", ["run"]) == pytest.approx(100.0)  # "running" -> run: one token, LCS 1
    # Short words (<= 3 letters) are not stemmed: "ran" stays "ran", so nothing matches "run".
    assert rouge_l("ran", ["run"]) == 0.0
    # Max over references, whatever their order: "dog" scores 0; "the cat sat" has LCS 3,
    # P = 3/6, R = 3/3, F = 2*(1/2)*1 / (3/2) = 2/3 -> 66.666... (min would be 0, mean 33.3).
    for refs in (["dog", "the cat sat"], ["the cat sat", "dog"]):
        assert rouge_l("the cat sat on the mat", refs) == pytest.approx(200 / 3)
    assert rouge_l("", ["anything"]) == 0.0  # an empty answer scores 0, not an error


@pytest.mark.parametrize("prediction, references", [
    ("The quick brown foxes jumped over lazy dogs", ["a quick brown fox jumps over the lazy dog", "no"]),
    ("Paris is the capital of France.", ["The capital of France is Paris", "Paris"]),
    ("connected connections connecting", ["connect", "connection was connected"]),
    ("42 and 3.14159", ["the answer is 42", "pi is 3 14159"]),
])
def test_rouge_l_matches_the_oracle(prediction, references):
    assert rouge_l(prediction, references) == pytest.approx(100 * max(_oracle_f(prediction, r) for r in references))


EXAMPLES = [Example("Name a fruit."), Example("Tell me about the sun."), Example("Write a short poem about rain.")]


def test_evaluate_rouge_sampling_protocol_is_the_mean_over_prompts_and_seeds(tiny_pair, tiny_cfg):
    """Decode each seed independently with the documented protocol (sampling at T=1, top-p 1,
    top-k 0, no-repeat 6-grams), score with the oracle, average: evaluate_rouge must agree.

    References are built from seed 3's own answers, so seed 3 scores exactly 100 on every prompt
    (a hand-checkable value that pins which decode belongs to which seed); prompt 0 also lists
    seed 11's answer, so seed 11 scores 100 there and less elsewhere: its mean over prompts is
    neither 0 nor 100, and a max (or a single prompt) in place of the mean shows.
    """
    tokenizer, _, large = tiny_pair
    source = LocalLogitSource(large)
    data_cfg = tiny_cfg.data
    cfg = EvalConfig(protocol="sampling", seeds=[3, 11], max_new_tokens=10, batch_size=2, no_repeat_ngram_size=6)
    prompts = [format_prompt(ex, data_cfg.template, tokenizer) for ex in EXAMPLES]
    answers = {}
    for seed in cfg.seeds:
        decoding = Decoding(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                            no_repeat_ngram_size=6, seed=seed)
        ids = generate_ids(source, tokenizer, prompts, decoding, 2, data_cfg.max_prompt_tokens)
        answers[seed] = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    assert all(_tokens(a) for a in answers[3]), answers  # non-empty answers: 100 is reachable
    assert answers[3] != answers[11]  # the seeds sample different answers
    examples = [replace(ex, references=(answer, answers[11][0] if i == 0 else "an unrelated second reference"))
                for i, (ex, answer) in enumerate(zip(EXAMPLES, answers[3]))]

    expected = [sum(max(_oracle_f(a, r) for r in ex.all_references) for a, ex in zip(answers[s], examples))
                * 100 / len(examples) for s in cfg.seeds]
    assert expected[0] == pytest.approx(100.0) and 100 / 3 - 1e-9 <= expected[1] < 100.0
    result = evaluate_rouge(source, tokenizer, examples, cfg, data_cfg)
    assert result.num_prompts == 3
    assert result.per_seed == pytest.approx(expected, abs=1e-9)
    assert result.rouge_l == pytest.approx(sum(expected) / 2, abs=1e-9)
    assert "sampling" in result.protocol and "seeds=[3, 11]" in result.protocol


def test_evaluate_rouge_greedy_protocol_is_one_decode(tiny_pair, tiny_cfg):
    from fedpt.proxy import stop_token_ids

    from .test_train_distill import StopAt

    tokenizer, _, large = tiny_pair
    # Never a stop token: every answer is 10 tokens long, wherever this CPU's rounding would have
    # made the tiny model stop (an empty answer would have no Rouge tokens).
    source = StopAt(LocalLogitSource(large), tokenizer.eos_token_id, stop_token_ids(tokenizer), at=set())
    prompts = [format_prompt(ex, tiny_cfg.data.template, tokenizer) for ex in EXAMPLES]
    ids = generate_ids(source, tokenizer, prompts, Decoding(max_new_tokens=10), 8, tiny_cfg.data.max_prompt_tokens)
    assert [len(row) for row in ids] == [10] * len(EXAMPLES)
    answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    # Prompt 0's reference is its own greedy answer (F = 1); the others' share nothing with it.
    examples = [replace(EXAMPLES[0], references=(answers[0],)),
                replace(EXAMPLES[1], references=("zzzz qqqq",)),
                replace(EXAMPLES[2], references=(answers[2], "zzzz"))]
    result = evaluate_rouge(source, tokenizer, examples, EvalConfig(protocol="greedy", max_new_tokens=10),
                            tiny_cfg.data)
    # (100 + 0 + 100) / 3 when both answers have tokens; the oracle says what the middle one scores.
    expected = (100 + 100 * _oracle_f(answers[1], "zzzz qqqq") + 100) / 3
    assert _tokens(answers[0]) and _tokens(answers[2])
    assert result.per_seed == pytest.approx([expected]) and result.rouge_l == pytest.approx(expected)


def test_sets_packed_into_shared_batches_score_as_if_alone(tiny_pair, tiny_cfg):
    """``evaluate_rouge_sets`` decodes two sets as one stream (batch 2: the second batch holds
    set A's last prompt and set B's first). Independently: decode the concatenated prompts in
    the same batches with ``generate_ids``, split at the boundary by hand, score with the oracle.
    Set A must be handed over (``on_set``) before the last batch is decoded."""
    from fedpt.evaluate import evaluate_rouge_sets

    tokenizer, _, large = tiny_pair
    source = LocalLogitSource(large)
    sets = {"a": [replace(ex, references=(f"reference {i} of a",)) for i, ex in enumerate(EXAMPLES)],
            "b": [Example("Say hello.", references=("hello there",)), Example("Count to three.", references=("1 2 3",))]}
    cfg = EvalConfig(protocol="greedy", max_new_tokens=6, batch_size=2)
    prompts = [format_prompt(ex, tiny_cfg.data.template, tokenizer) for ex in sets["a"] + sets["b"]]
    ids = generate_ids(source, tokenizer, prompts, Decoding(max_new_tokens=6), 2, tiny_cfg.data.max_prompt_tokens)
    answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    by_set = {"a": answers[:3], "b": answers[3:]}

    decoded, handed_over = [0], {}
    results = evaluate_rouge_sets(source, tokenizer, sets, cfg, tiny_cfg.data,
                                  on_prompts=lambda n: decoded.__setitem__(0, decoded[0] + n),
                                  on_set=lambda name, result: handed_over.setdefault(name, decoded[0]))
    assert list(results) == ["a", "b"]
    for name, examples in sets.items():
        expected = [100 * max(_oracle_f(a, r) for r in ex.all_references) for a, ex in zip(by_set[name], examples)]
        assert results[name].predictions == [by_set[name]]
        assert results[name].scores[0] == pytest.approx(expected, abs=1e-9)
        assert results[name].rouge_l == pytest.approx(sum(expected) / len(expected), abs=1e-9)
        assert results[name].num_prompts == len(examples) and len(results[name].ids) == len(examples)
        assert results[name].prompts == [format_prompt(ex, tiny_cfg.data.template, tokenizer) for ex in examples]
    # handed over inside the batch that finished it: A after 2 prompts had been counted, B at the end
    assert handed_over == {"a": 2, "b": 4}
