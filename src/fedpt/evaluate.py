"""Rouge-L exactly as MiniLLM/DistiLLM report it, over any ``LogitSource``.

rouge-score's ``rougeL`` F-measure with Porter stemming, max over a prompt's references,
mean over prompts, x100. Decoding: greedy (quick runs) or the headline protocol, sampling
at temperature 1, top-p 1, top-k 0, no_repeat_ngram_size 6, averaged over 5 seeds.
Knows neither Flower nor training.
"""

from __future__ import annotations

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


@dataclass
class EvalResult:
    rouge_l: float
    num_prompts: int
    protocol: str
    per_seed: list[float] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, answer) of the first seed

    def describe(self) -> str:
        return f"Rouge-L {self.rouge_l:.2f} on {self.num_prompts} prompts ({self.protocol})"


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
    source: LogitSource, tokenizer: Any, examples: list[Example], cfg: EvalConfig, data_cfg: DataConfig
) -> EvalResult:
    prompts = [format_prompt(ex, data_cfg.template, tokenizer) for ex in examples]
    per_seed, samples = [], []
    for decoding in decodings(cfg):
        ids = generate_ids(source, tokenizer, prompts, decoding, cfg.batch_size, data_cfg.max_prompt_tokens)
        answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        scores = [rouge_l(answer, ex.all_references) for answer, ex in zip(answers, examples)]
        per_seed.append(sum(scores) / len(scores))
        samples = samples or list(zip(prompts, answers))
    return EvalResult(sum(per_seed) / len(per_seed), len(examples), protocol_name(cfg), per_seed, samples)
