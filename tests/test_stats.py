"""Bootstrap intervals (fedpt.stats) against independent computations: a degenerate case worked by
hand, scipy's bootstrap on the same data, the normal approximation, and paired vs unpaired on
correlated scores."""

import numpy as np
import pytest

from fedpt.intervals import NOT_DISTINGUISHABLE, verdict
from fedpt.stats import bootstrap_ci, paired_bootstrap_diff


def test_constant_scores_give_a_point_interval():
    interval = bootstrap_ci([42.0] * 30)
    assert (interval.estimate, interval.low, interval.high, interval.n) == (42.0, 42.0, 42.0, 30)


def test_two_values_by_hand():
    # Scores {0, 100} on 2 prompts: a resample's mean is 0, 50 or 100 with probability 1/4, 1/2, 1/4,
    # so the 2.5th percentile is 0 and the 97.5th is 100 (any reasonable number of resamples).
    interval = bootstrap_ci([0.0, 100.0], samples=4000)
    assert (interval.estimate, interval.low, interval.high) == (50.0, 0.0, 100.0)


def test_seed_axis_is_averaged_before_resampling():
    per_seed = [[10.0, 20.0, 30.0, 90.0], [30.0, 40.0, 50.0, 10.0]]  # [seed][prompt]
    assert bootstrap_ci(per_seed) == bootstrap_ci([20.0, 30.0, 40.0, 50.0])


def test_same_seed_same_interval_other_seed_other_interval():
    scores = np.random.default_rng(0).uniform(0, 100, size=50)
    assert bootstrap_ci(scores) == bootstrap_ci(scores)
    assert bootstrap_ci(scores, seed=1) != bootstrap_ci(scores)


def test_matches_scipy_percentile_bootstrap():
    from scipy.stats import bootstrap

    scores = np.random.default_rng(3).gamma(2.0, 12.0, size=120)
    ours = bootstrap_ci(scores, samples=20000)
    theirs = bootstrap((scores,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                       random_state=np.random.default_rng(99)).confidence_interval
    # Different random draws: the ends agree to Monte Carlo error (~0.1 here), not to the bit.
    assert ours.low == pytest.approx(theirs.low, abs=0.25)
    assert ours.high == pytest.approx(theirs.high, abs=0.25)
    # ... and both match the normal approximation mean +- 1.96 * sd / sqrt(n) for this n.
    half = 1.96 * scores.std(ddof=1) / np.sqrt(scores.size)
    assert ours.low == pytest.approx(scores.mean() - half, abs=0.4)
    assert ours.high == pytest.approx(scores.mean() + half, abs=0.4)


def test_paired_is_narrow_where_unpaired_is_not():
    """Prompt difficulty is shared (sd 20); model a beats b by 2 points with per-prompt noise sd 2.

    Paired, the difference's interval is about mean 2 +- 0.4 and excludes zero; two unpaired
    intervals overlap (each is +- ~4) and cannot tell.
    """
    rng = np.random.default_rng(7)
    difficulty = rng.normal(40, 20, size=100)
    a = difficulty + 2 + rng.normal(0, 2, size=100)
    b = difficulty + rng.normal(0, 2, size=100)
    ids = [f"p{i}" for i in range(100)]
    diff = paired_bootstrap_diff(dict(zip(ids, a)), dict(zip(ids, b)))
    assert diff.estimate == pytest.approx(float(np.mean(a - b)))
    assert diff.excludes_zero() and diff.low > 1.0 and diff.high < 3.0
    # Independent check of the paired interval: the normal approximation on the differences.
    half = 1.96 * np.std(a - b, ddof=1) / 10
    assert diff.low == pytest.approx(np.mean(a - b) - half, abs=0.15)
    ci_a, ci_b = bootstrap_ci(a), bootstrap_ci(b)
    assert ci_a.low < ci_b.high and ci_b.low < ci_a.high  # unpaired: overlapping
    assert verdict(diff, "a", "b") == "a higher than b"
    assert verdict(paired_bootstrap_diff(dict(zip(ids, b)), dict(zip(ids, a))), "b", "a") == "a higher than b"


def test_paired_matches_prompts_by_id_not_position():
    a = {"x": 10.0, "y": 50.0, "z": 90.0}
    b = {"z": 89.0, "x": 9.0, "y": 49.0}  # same prompts, other order: every difference is +1
    diff = paired_bootstrap_diff(a, b)
    assert (diff.estimate, diff.low, diff.high) == pytest.approx((1.0, 1.0, 1.0))


def test_no_difference_is_not_a_claim():
    rng = np.random.default_rng(11)
    base = rng.uniform(0, 100, size=80)
    ids = [str(i) for i in range(80)]
    diff = paired_bootstrap_diff(dict(zip(ids, base + rng.normal(0, 5, 80))), dict(zip(ids, base)))
    assert not diff.excludes_zero()
    assert verdict(diff, "a", "b") == NOT_DISTINGUISHABLE


def test_mismatched_prompt_sets_are_refused():
    with pytest.raises(ValueError, match="different prompts"):
        paired_bootstrap_diff({"x": 1.0, "y": 2.0}, {"x": 1.0})
    with pytest.raises(ValueError):
        bootstrap_ci([])
