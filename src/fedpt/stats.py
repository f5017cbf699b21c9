"""Bootstrap confidence intervals for Rouge-L and paired differences. Knows no model.

**What is resampled.** Prompts. Each prompt's score is first averaged over the protocol's
seeds (one seed under greedy decoding), then prompts are drawn with replacement, ``SAMPLES``
times, and the 2.5th and 97.5th percentiles of the resampled means form the 95% interval
(percentile bootstrap). The seeds are a fixed part of the sampling protocol, not a population:
their noise is inside each prompt's mean and so inside the spread over prompts; a second
level (resampling seeds within a prompt) would add little with 5 seeds and is not done.

**Paired differences.** Two models scored on the same prompts: the per-prompt differences are
resampled (one index draw for both models), which removes the variation both share (hard
prompts are hard for both). This is narrower than comparing two unpaired intervals.

Draws come from ``numpy.random.default_rng(SEED)``: a rerun gives the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SAMPLES = 2000
SEED = 20241001
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float  # mean over prompts (of the difference, for a comparison)
    low: float
    high: float
    n: int  # prompts

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}


def bootstrap_ci(scores: Sequence[float] | Sequence[Sequence[float]], samples: int = SAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> Interval:
    """Percentile bootstrap interval of the mean over prompts.

    ``scores``: one score per prompt, or ``[seed][prompt]`` (averaged over seeds first).
    """
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 2:
        values = values.mean(axis=0)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty list of per-prompt scores, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high), int(values.size))


def paired_bootstrap_diff(a: dict[str, float], b: dict[str, float], samples: int = SAMPLES, seed: int = SEED,
                          level: float = LEVEL) -> Interval:
    """Interval of mean(a - b) over the prompts both were scored on ({prompt id: score})."""
    common = [pid for pid in a if pid in b]
    if not common:
        raise ValueError("paired_bootstrap_diff: the two score sets share no prompt id")
    if len(common) != len(a) or len(common) != len(b):
        raise ValueError(f"paired_bootstrap_diff: the models were scored on different prompts "
                         f"({len(a)} and {len(b)}, {len(common)} in common)")
    return bootstrap_ci([a[pid] - b[pid] for pid in common], samples, seed, level)
