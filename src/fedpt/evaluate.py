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
    prompts = [format_prompt(ex, data_cfg.template, tokenizer) for ex in examples]
    per_seed, samples, seeds, predictions, all_scores = [], [], [], [], []
    for decoding in decodings(cfg):
        ids = generate_ids(source, tokenizer, prompts, decoding, cfg.batch_size, data_cfg.max_prompt_tokens,
                           on_prompts=on_prompts)
        answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        scores = [rouge_l(answer, ex.all_references) for answer, ex in zip(answers, examples)]
        per_seed.append(sum(scores) / len(scores))
        samples = samples or list(zip(prompts, answers))
        seeds.append(decoding.seed if decoding.do_sample else None)
        predictions.append(answers)
        all_scores.append(scores)
    return EvalResult(sum(per_seed) / len(per_seed), len(examples), protocol_name(cfg), per_seed, samples,
                      ids=[example_id(ex) for ex in examples], prompts=prompts,
                      references=[ex.all_references for ex in examples], seeds=seeds, predictions=predictions,
                      scores=all_scores)
