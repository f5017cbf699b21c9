"""Rouge-L exactly as MiniLLM/DistiLLM report it, over any ``LogitSource``.

rouge-score's ``rougeL`` F-measure with Porter stemming, max over a prompt's references,
mean over prompts, x100. Decoding: greedy (quick runs) or the headline protocol, sampling
at temperature 1, top-p 1, top-k 0, no_repeat_ngram_size 6, averaged over 5 seeds.
Knows neither Flower nor training.

Every score keeps the outputs behind it: ``EvalResult`` holds each prompt's id, text,
references, prediction and Rouge-L per seed (``fedpt.predictions`` writes them to JSONL), so
any number can be recomputed with ``rouge_score`` alone and bootstrapped over prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate
from typing import Any

from fedpt.config import DataConfig, EvalConfig
from fedpt.data.prompts import format_prompt
from fedpt.data.records import Example
from fedpt.models.logits import LogitSource
from fedpt.proxy import Decoding, generate_ids


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """Best Rouge-L F-measure (x100) of ``prediction`` against any reference."""
    return 100.0 * max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def example_id(example: Example) -> str:
    """A prompt's id: a hash of its instruction and input, the same in every run and system
    (paired comparisons match prompts by it)."""
    return hashlib.sha1(f"{example.instruction.strip()}\0{example.context.strip()}".encode()).hexdigest()[:12]


@dataclass
class EvalResult:
    rouge_l: float  # mean over seeds of the mean over prompts (x100)
    num_prompts: int
    protocol: str
    per_seed: list[float] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) of the first seed
    # What the score is made of, prompt by prompt (same order in every list):
    ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # as the model saw them (template applied)
    references: list[tuple[str, ...]] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)  # one per decoding; None = greedy
    predictions: list[list[str]] = field(default_factory=list)  # [seed][prompt]
    scores: list[list[float]] = field(default_factory=list)  # [seed][prompt] Rouge-L x100

    def describe(self) -> str:
        return f"Rouge-L {self.rouge_l:.2f} on {self.num_prompts} prompts ({self.protocol})"

    def per_prompt(self) -> list[float]:
        """Each prompt's Rouge-L averaged over the protocol's seeds (what the bootstrap resamples)."""
        return [sum(column) / len(column) for column in zip(*self.scores)]

    def rows(self) -> list[dict]:
        """One row per prompt and seed: what ``fedpt.predictions`` writes."""
        return [{"id": pid, "prompt": prompt, "prediction": predictions[i], "references": list(refs),
                 "rouge_l": scores[i], "seed": seed}
                for seed, predictions, scores in zip(self.seeds, self.predictions, self.scores)
                for i, (pid, prompt, refs) in enumerate(zip(self.ids, self.prompts, self.references))]


def decodings(cfg: EvalConfig) -> list[Decoding]:
    """One Decoding per seed of the protocol (one, greedy, for quick runs)."""
    if cfg.protocol == "greedy":
        return [Decoding(max_new_tokens=cfg.max_new_tokens)]
    return [
        Decoding(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                 no_repeat_ngram_size=cfg.no_repeat_ngram_size, seed=seed)
        for seed in cfg.seeds
    ]


def protocol_name(cfg: EvalConfig) -> str:
    if cfg.protocol == "greedy":
        return f"greedy, max_new_tokens={cfg.max_new_tokens}"
    return (f"sampling T=1 top_p=1 top_k=0 no_repeat_ngram={cfg.no_repeat_ngram_size}, "
            f"seeds={cfg.seeds}, max_new_tokens={cfg.max_new_tokens}")


def evaluate_rouge(
    source: LogitSource, tokenizer: Any, examples: list[Example], cfg: EvalConfig, data_cfg: DataConfig,
    on_prompts: Callable[[int], None] | None = None,
) -> EvalResult:
    """Decode and score every example under the protocol; ``on_prompts(n)`` after each batch (progress)."""
    return evaluate_rouge_sets(source, tokenizer, {"": examples}, cfg, data_cfg, on_prompts)[""]


def evaluate_rouge_sets(
    source: LogitSource, tokenizer: Any, sets: dict[str, list[Example]], cfg: EvalConfig, data_cfg: DataConfig,
    on_prompts: Callable[[int], None] | None = None,
    on_set: Callable[[str, EvalResult], None] | None = None,
) -> dict[str, EvalResult]:
    """``evaluate_rouge`` of several sets decoded as one stream of batches: {set: EvalResult}.

    A batch may hold the end of one set and the start of the next, so small sets fill whole
    batches (on a CPU a 24-row decoding step costs far less than three 8-row ones). Each set is
    scored as if alone: the same prompts, protocol and per-prompt scores; only the batch company
    differs (which changes an engine's rounding, not the computation). ``on_set(name, result)``
    is told as soon as a set's last prompt is decoded under every seed, so a caller can keep
    finished sets even if the rest is stopped.
    """
    names = list(sets)
    examples = [ex for name in names for ex in sets[name]]
    ends = dict(zip(names, accumulate(len(sets[name]) for name in names)))  # one past each set's last prompt
    prompts = [format_prompt(ex, data_cfg.template, tokenizer) for ex in examples]
    runs = decodings(cfg)
    answers: list[list[str]] = []  # [seed][prompt]
    results: dict[str, EvalResult] = {}

    def finish_sets(decoded: int) -> None:
        """Score every set whose prompts are all decoded under the last seed."""
        for name in names:
            if name in results or ends[name] > decoded:
                continue
            first = ends[name] - len(sets[name])
            results[name] = _score_set(sets[name], prompts[first: ends[name]],
                                       [seed_answers[first: ends[name]] for seed_answers in answers], runs, cfg)
            if on_set is not None:
                on_set(name, results[name])

    def keep(rows: list[list[int]], _steps: Any) -> None:  # a batch of the seed being decoded
        answers[-1].extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows)
        if len(answers) == len(runs):
            finish_sets(len(answers[-1]))

    for decoding in runs:
        answers.append([])
        generate_ids(source, tokenizer, prompts, decoding, cfg.batch_size, data_cfg.max_prompt_tokens,
                     on_batch=keep, on_prompts=on_prompts, keep_step_logits=False)
    finish_sets(len(examples))  # empty sets
    return {name: results[name] for name in names}


def _score_set(examples: list[Example], prompts: list[str], answers: list[list[str]], runs: list[Decoding],
               cfg: EvalConfig) -> EvalResult:
    """One set's EvalResult from its prompts' answers under each decoding ([seed][prompt])."""
    scores = [[rouge_l(answer, ex.all_references) for answer, ex in zip(seed_answers, examples)]
              for seed_answers in answers]
    per_seed = [sum(seed_scores) / len(seed_scores) if seed_scores else 0.0 for seed_scores in scores]
    return EvalResult(sum(per_seed) / len(per_seed), len(examples), protocol_name(cfg), per_seed,
                      list(zip(prompts, answers[0])), ids=[example_id(ex) for ex in examples], prompts=prompts,
                      references=[ex.all_references for ex in examples],
                      seeds=[d.seed if d.do_sample else None for d in runs], predictions=answers, scores=scores)
