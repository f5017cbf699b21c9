"""Confidence intervals for a run's Rouge-L numbers and the paper's comparisons, from saved predictions.

Per-prompt scores live in the prediction files (``fedpt.predictions``), not in ``rounds.jsonl``;
everything here reads them back, so an interval is always computed from the same outputs as
its number. Bootstrap details: ``fedpt.stats``.
"""

from __future__ import annotations

from pathlib import Path

from fedpt.predictions import model_name, per_prompt_scores, prediction_path, read_predictions
from fedpt.stats import LEVEL, SAMPLES, SEED, Interval, bootstrap_ci, paired_bootstrap_diff

NOT_DISTINGUISHABLE = "not distinguishable at this size"
ALL_SETS = "all sets"  # the comparisons pooled over every evaluation set's prompts

# (label, (system, model), (system, model)); model "pretrained-large" is the system's round 0,
# any other model is the system's last evaluated round. Reads: "A vs B", difference A - B.
COMPARISONS: tuple[tuple[str, tuple[str, str], tuple[str, str]], ...] = (
    ("FedPT vs FedAvg-large", ("fedpt", "proxy"), ("fedavg-large", "large")),
    ("FedPT vs FedAvg+PT", ("fedpt", "proxy"), ("fedavg-pt", "proxy")),
    ("FedAvg+PT vs FedAvg-small", ("fedavg-pt", "proxy"), ("fedavg-small", "small")),
    ("FedPT proxy vs pretrained large", ("fedpt", "proxy"), ("fedpt", "pretrained-large")),
    ("FedAvg+PT proxy vs pretrained large", ("fedavg-pt", "proxy"), ("fedavg-pt", "pretrained-large")),
    ("FedPT's distilled small vs FedAvg-small", ("fedpt", "small"), ("fedavg-small", "small")),
    ("FedPT proxy-tuned large vs FedPT's distilled small", ("fedpt", "proxy"), ("fedpt", "small")),
)

# The paper's central claim, FedPT's proxy-tuned large LM ~ FedAvg on the large LM, is judged by
# equivalence: a margin fixed before any paper-cpu piece ran (issue 19), in Rouge-L points, on the
# interval of the difference pooled over every evaluation set.
CENTRAL_CLAIM = "FedPT vs FedAvg-large"
EQUIVALENCE_MARGIN = 2.0

BOOTSTRAP = {"samples": SAMPLES, "seed": SEED, "level": LEVEL,
             "method": "percentile bootstrap over prompts (each prompt's score averaged over the protocol's "
                       "seeds first); comparisons are paired: per-prompt differences on the same prompt ids"}


def record_intervals(run_dir: Path, system: str, record: dict | None) -> dict[str, dict[str, dict]]:
    """{set: {role: interval}} for one record of ``rounds.jsonl`` (as a dict), from its prediction files.

    Roles without a prediction file (a run from before predictions were saved) are left out.
    """
    out: dict[str, dict[str, dict]] = {}
    for set_name, roles in ((record or {}).get("rougeL_sets") or {}).items():
        for role in roles:
            path = prediction_path(run_dir, system, record["round"], set_name, model_name(role, record["round"]))
            if path.is_file():
                scores = list(per_prompt_scores(read_predictions(path)).values())
                out.setdefault(set_name, {})[role] = bootstrap_ci(scores).to_json()
    return out


def side_scores(run_dir: Path, system: str, model: str, final_round: int, set_name: str) -> dict[str, float] | None:
    """{prompt id: Rouge-L} of one side of a comparison (``pretrained-*``: round 0), None without its file."""
    server_round = 0 if model.startswith("pretrained-") else final_round
    path = prediction_path(run_dir, system, server_round, set_name, model)
    return per_prompt_scores(read_predictions(path)) if path.is_file() else None


def comparisons(run_dir: Path, final_rounds: dict[str, int], sets: list[str]) -> list[dict]:
    """Paired bootstrap CI of each comparison the paper makes, per set and pooled over all sets.

    ``final_rounds``: {system: its last evaluated round}. Comparisons whose systems did not run
    (or whose predictions are missing) are skipped.
    """
    rows = []
    for label, (sys_a, model_a), (sys_b, model_b) in COMPARISONS:
        if sys_a not in final_rounds or sys_b not in final_rounds:
            continue
        pooled_a: dict[str, float] = {}
        pooled_b: dict[str, float] = {}
        for set_name in sets:
            a = side_scores(run_dir, sys_a, model_a, final_rounds[sys_a], set_name)
            b = side_scores(run_dir, sys_b, model_b, final_rounds[sys_b], set_name)
            if a is None or b is None:
                continue
            rows.append(_comparison_row(label, set_name, (sys_a, model_a), (sys_b, model_b), a, b))
            pooled_a |= {f"{set_name}/{pid}": v for pid, v in a.items()}
            pooled_b |= {f"{set_name}/{pid}": v for pid, v in b.items()}
        if len(sets) > 1 and pooled_a and len(pooled_a) == len(pooled_b):
            rows.append(_comparison_row(label, ALL_SETS, (sys_a, model_a), (sys_b, model_b), pooled_a, pooled_b))
    return rows


def _comparison_row(label: str, set_name: str, side_a: tuple[str, str], side_b: tuple[str, str],
                    a: dict[str, float], b: dict[str, float]) -> dict:
    diff = paired_bootstrap_diff(a, b)
    mean = lambda scores: sum(scores.values()) / len(scores)  # noqa: E731
    return {"comparison": label, "set": set_name, "a": f"{side_a[0]} {side_a[1]}", "b": f"{side_b[0]} {side_b[1]}",
            "a_rouge_l": mean(a), "b_rouge_l": mean(b), **{f"diff_{k}": v for k, v in diff.to_json().items()},
            "verdict": verdict(diff, f"{side_a[0]} {side_a[1]}", f"{side_b[0]} {side_b[1]}")}


def verdict(diff: Interval, a: str, b: str) -> str:
    """A claim only where the interval excludes zero."""
    if not diff.excludes_zero():
        return NOT_DISTINGUISHABLE
    better, worse = (a, b) if diff.estimate > 0 else (b, a)
    return f"{better} higher than {worse}"


def direction(diff: Interval) -> str:
    """A's side of "A vs B": ``higher`` / ``lower`` where the interval excludes zero, else not distinguishable."""
    if diff.low > 0:
        return "higher"
    if diff.high < 0:
        return "lower"
    return "not distinguishable"


def equivalence(diff: Interval, margin: float = EQUIVALENCE_MARGIN) -> str:
    """A against B with an equivalence margin: ``equivalent`` when the whole interval lies inside
    [-margin, +margin] (ends included), ``better`` / ``worse`` when it lies wholly above +margin /
    below -margin, else ``undecided`` (the interval straddles a margin: more prompts would tell)."""
    if -margin <= diff.low and diff.high <= margin:
        return "equivalent"
    if diff.low > margin:
        return "better"
    if diff.high < -margin:
        return "worse"
    return "undecided"
