"""Intervals and comparisons read from prediction files, and results.md's claims follow them.

Synthetic prediction files (no model): on shared prompt difficulty, FedPT's proxy beats
FedAvg-large by 5 points, FedAvg+PT's proxy equals FedPT's up to noise, FedAvg-small is 3 below.
"""

import json

import numpy as np

from fedpt.config import load_config
from fedpt.intervals import NOT_DISTINGUISHABLE
from fedpt.metrics import RoundRecord
from fedpt.report import render
from fedpt.runner import format_table, write_summary

N = 60


def _write(path, scores, seeds=(None,)):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for seed in seeds:
            for i, score in enumerate(scores):
                handle.write(json.dumps({"id": f"p{i}", "prompt": "q", "prediction": "a", "references": ["a"],
                                         "rouge_l": float(score), "seed": seed}) + "\n")


def _fake_run(tmp_path):
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(10, 60, size=N)
    noise = lambda: rng.normal(0, 1.5, size=N)  # noqa: E731
    scores = {("fedpt", "proxy"): difficulty + 5 + noise(), ("fedavg-pt", "proxy"): difficulty + 5 + noise(),
              ("fedavg-large", "large"): difficulty + noise(), ("fedavg-small", "small"): difficulty + 2 + noise(),
              ("fedpt", "small"): difficulty + 2 + noise(), ("fedavg-pt", "small"): difficulty + 2 + noise()}
    pretrained = {"small": difficulty - 1 + noise(), "large": difficulty + noise()}
    records = []
    for system in ("fedpt", "fedavg-small", "fedavg-large", "fedavg-pt"):
        zero, one = RoundRecord(round=0, system=system), RoundRecord(round=1, system=system)
        roles0 = ["large"] if system == "fedavg-large" else ["small"] + (["large"] if "pt" in system else [])
        for role in roles0:
            _write(tmp_path / system / "predictions" / f"round-0000.s.pretrained-{role}.jsonl", pretrained[role])
            zero.rougeL_sets.setdefault("s", {})[role] = float(pretrained[role].mean())
        for (owner, role), values in scores.items():
            if owner == system:
                _write(tmp_path / system / "predictions" / f"round-0001.s.{role}.jsonl", values)
                one.rougeL_sets.setdefault("s", {})[role] = float(values.mean())
        records += [zero, one]
    cfg = load_config(preset="tiny", overrides=["federation.rounds=1"])
    return cfg, records, scores


def test_comparisons_claim_only_what_the_paired_interval_supports(tmp_path):
    cfg, records, scores = _fake_run(tmp_path)
    summary = write_summary(tmp_path, cfg, records, {"s": N}, None, None)
    found = {row["comparison"]: row for row in summary["comparisons"]}
    assert set(found) == {"FedPT vs FedAvg-large", "FedPT vs FedAvg+PT", "FedAvg+PT vs FedAvg-small",
                          "FedPT proxy vs pretrained large", "FedAvg+PT proxy vs pretrained large",
                          "FedPT's distilled small vs FedAvg-small",
                          "FedPT proxy-tuned large vs FedPT's distilled small"}
    big = found["FedPT vs FedAvg-large"]
    expected = float(np.mean(scores[("fedpt", "proxy")] - scores[("fedavg-large", "large")]))
    assert abs(big["diff_estimate"] - expected) < 1e-9 and big["diff_n"] == N
    assert big["diff_low"] > 3 and big["verdict"] == "fedpt proxy higher than fedavg-large large"
    assert found["FedPT vs FedAvg+PT"]["verdict"] == NOT_DISTINGUISHABLE
    assert found["FedAvg+PT vs FedAvg-small"]["verdict"] == "fedavg-pt proxy higher than fedavg-small small"
    # the per-score interval of FedPT's proxy: around its mean, a few points wide (sd of difficulty ~14)
    ci = summary["systems"]["fedpt"]["ci"]["final"]["s"]["proxy"]
    assert ci["low"] < ci["estimate"] < ci["high"] and 4 < ci["high"] - ci["low"] < 12
    # ... and much wider than the paired interval of a difference on the same prompts
    assert big["diff_high"] - big["diff_low"] < (ci["high"] - ci["low"]) / 3
    table = format_table(summary)
    assert "fedpt proxy higher than fedavg-large large" in table
    # fedpt report writes the same claims from the same files
    cfg.save(tmp_path / "config.toml")
    (tmp_path / "rounds.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    markdown, _ = render(tmp_path, tmp_path / "results.md")
    rows = [line for line in markdown.splitlines() if line.startswith("| FedPT vs FedAvg+PT |")]
    assert len(rows) == 1 and rows[0].endswith("| not distinguishable |  |")
    rows = [line for line in markdown.splitlines() if line.startswith("| FedPT vs FedAvg-large |")]
    assert len(rows) == 1 and rows[0].endswith("| higher | better |")  # +5 on every prompt: beyond the ±2 margin
    assert "| fedpt | 1 | s | proxy |" in markdown and "fedpt/predictions/round-0001.s.proxy.jsonl" in markdown


def test_seeds_are_averaged_per_prompt_before_pairing(tmp_path):
    """Sampling protocol: two seeds per prompt; the interval is over prompts, not prompt-seed rows."""
    from fedpt.intervals import comparisons

    a = np.arange(N, dtype=float)
    for system, role, offset in (("fedpt", "proxy", 1.0), ("fedavg-large", "large", 0.0)):
        path = tmp_path / system / "predictions" / f"round-0001.s.{role}.jsonl"
        path.parent.mkdir(parents=True)
        with path.open("w") as handle:
            for seed, shift in ((10, -3.0), (20, 3.0)):  # the seeds disagree by 6, their mean is a + offset
                for i in range(N):
                    handle.write(json.dumps({"id": f"p{i}", "rouge_l": a[i] + offset + shift, "seed": seed}) + "\n")
    rows = comparisons(tmp_path, {"fedpt": 1, "fedavg-large": 1}, ["s"])
    assert len(rows) == 1
    assert (rows[0]["diff_estimate"], rows[0]["diff_low"], rows[0]["diff_high"], rows[0]["diff_n"]) == (1.0, 1.0, 1.0, N)
