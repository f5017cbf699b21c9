"""``fedpt report``: the published results page is exactly what the committed files say.

No model is loaded here: synthetic prediction files stand in for runs where a folder is needed.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from fedpt.cli import main
from fedpt.config import SYSTEMS, load_config
from fedpt.export import check_committed
from fedpt.intervals import EQUIVALENCE_MARGIN, direction, equivalence
from fedpt.metrics import RoundRecord
from fedpt.report import NOT_YET_RUN, make_plots, render, write_report
from fedpt.stats import Interval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "paper-cpu"
DOCS = REPO / "docs" / "results.md"


def test_docs_results_md_is_the_report_of_the_committed_results():
    """CI: rebuild docs/results.md from results/paper-cpu/ alone; any difference fails (fix: run the command)."""
    assert RESULTS.is_dir(), "results/paper-cpu/ must exist (its README at least)"
    assert check_committed(RESULTS) == []  # no checkpoints, no file over 10 MiB
    started = time.perf_counter()
    text, plots = render(RESULTS, DOCS)
    assert time.perf_counter() - started < 60
    assert DOCS.read_text() == text, ("docs/results.md differs from what the committed results give: run "
                                      "`fedpt report results/paper-cpu --out docs/results.md` and commit both")
    for name in plots:  # the plots it shows are committed beside it
        assert (DOCS.parent / name).is_file(), name
    assert main(["report", str(RESULTS), "--out", str(DOCS), "--check"]) == 0


@pytest.mark.parametrize("low, high, expected_direction, expected_equivalence", [
    # hand-computed against the definitions: direction needs the interval to exclude 0; equivalence
    # needs it inside [-2, 2] (ends included), better/worse wholly beyond +2/-2, else undecided
    (0.5, 1.5, "higher", "equivalent"),
    (-1.9, 1.9, "not distinguishable", "equivalent"),
    (-2.0, 2.0, "not distinguishable", "equivalent"),   # touching the margin is inside
    (-2.01, 1.0, "not distinguishable", "undecided"),
    (-3.5, -0.4, "lower", "undecided"),                 # lower, but may still be within 2 points
    (-6.0, -2.5, "lower", "worse"),
    (2.1, 4.0, "higher", "better"),
    (1.0, 3.0, "higher", "undecided"),
    (0.0, 1.0, "not distinguishable", "equivalent"),   # low = 0 does not exclude zero
    (-4.0, 4.0, "not distinguishable", "undecided"),
])
def test_verdicts_on_constructed_intervals(low, high, expected_direction, expected_equivalence):
    diff = Interval((low + high) / 2, low, high, 300)
    assert EQUIVALENCE_MARGIN == 2.0  # fixed before the paper-cpu run (results/paper-cpu/README.md)
    assert direction(diff) == expected_direction
    assert equivalence(diff) == expected_equivalence


N = 40
SETS = ("s1", "s2")


def _write(path: Path, scores) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "q", "prediction": "a", "references": ["a"],
                                        "rouge_l": float(v), "seed": None}) + "\n" for i, v in enumerate(scores)))


def fake_experiment(folder: Path, systems=SYSTEMS, prompts: int = N, sets=SETS, shift: float = 1.0) -> Path:
    """An experiment folder with 2 rounds per system; FedPT's proxy is ``shift`` above FedAvg-large."""
    rng = np.random.default_rng(7)
    difficulty = rng.uniform(10, 60, size=prompts)
    folder.mkdir(parents=True)
    cfg = load_config(preset="tiny", overrides=[f"run.systems={list(SYSTEMS)}", "eval.every=2"])
    cfg.save(folder / "config.toml")
    final = {("fedpt", "proxy"): shift, ("fedpt", "small"): -3, ("fedavg-small", "small"): -4,
             ("fedavg-large", "large"): 0, ("fedavg-pt", "proxy"): shift - 0.5, ("fedavg-pt", "small"): -4}
    records = []
    for system in systems:
        zero, two = RoundRecord(0, system), RoundRecord(2, system, clients=3, seconds=5.0, bytes_up_per_device=10,
                                                       device_train_tokens=100.0)
        one = RoundRecord(1, system, clients=3, seconds=4.0, bytes_up_per_device=10, device_train_tokens=100.0)
        roles0 = ["large"] if system == "fedavg-large" else ["small"] + (["large"] if "pt" in system else [])
        for set_name in sets:
            for role in roles0:
                scores = difficulty - (2 if role == "small" else 0) + rng.normal(0, 1, prompts)
                _write(folder / system / "predictions" / f"round-0000.{set_name}.pretrained-{role}.jsonl", scores)
                zero.rougeL_sets.setdefault(set_name, {})[role] = float(scores.mean())
            for (owner, role), delta in final.items():
                if owner == system:
                    scores = difficulty + delta + rng.normal(0, 1, prompts)
                    _write(folder / system / "predictions" / f"round-0002.{set_name}.{role}.jsonl", scores)
                    two.rougeL_sets.setdefault(set_name, {})[role] = float(scores.mean())
        records += [zero, one, two]
    (folder / "rounds.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    pieces = [{"systems": list(systems), "command": "fedpt experiment --preset tiny", "started": "2026-01-01T00:00:00Z",
               "finished": "2026-01-01T01:00:00Z", "wall_seconds": 3600.0, "peak_memory_bytes": 2**31,
               "cpu": "Test CPU (avx2)", "cores": 2, "dtype": "float32", "params": {"small": [10, 100],
                                                                                   "large": [20, 400]}}]
    (folder / "pieces.json").write_text(json.dumps(pieces))
    if "fedpt" in systems:
        (folder / "alpha_sweep.json").write_text(json.dumps({"fedpt": {"2.0": {s: 0.0 for s in sets}}}))
    return folder


def test_missing_systems_are_not_yet_run_rows(tmp_path):
    folder = fake_experiment(tmp_path / "exp", systems=("fedpt", "fedavg-large"))
    text, plots = render(folder, tmp_path / "docs" / "results.md")
    assert ("Systems: fedpt: finished; fedavg-small: not yet run; fedavg-large: finished; "
            "fedavg-pt: not yet run.") in text
    lines = text.splitlines()
    for system in ("fedavg-small", "fedavg-pt"):
        assert f"| {system} | {NOT_YET_RUN} | | | | | | | |" in lines  # pieces
        assert f"| {system} | {NOT_YET_RUN} | | | | | |" in lines  # per round
        assert f"| {system} | {NOT_YET_RUN} | | | | | | | | |" in lines  # costs
        assert f"{system:<14}{'':<16}{NOT_YET_RUN}" in lines  # headline block
    # comparisons that need a missing system say which; the others are computed, per set and pooled
    assert "- **FedPT vs FedAvg+PT**: not yet run (needs fedavg-pt)." in text
    assert "| FedAvg+PT vs FedAvg-small | - | fedavg-pt proxy | fedavg-small small | not yet run (needs fedavg-pt, " \
           "fedavg-small) |" in text
    central = [line for line in text.splitlines() if line.startswith("| FedPT vs FedAvg-large |")]
    assert [line.split(" | ")[1] for line in central] == ["s1", "s2", "all sets"]
    # +1 point with little noise: higher, and within the ±2 margin (the margin is judged on the pooled row only)
    assert central[-1].endswith("| higher | equivalent |") and central[0].endswith("| higher |  |")
    assert "fedpt proxy − fedavg-large large, 80 prompts" in text  # pooled over both sets
    # links are relative to the output file; the prediction files are named
    assert "../exp/fedpt/predictions/round-0002.s1.proxy.jsonl" in text
    assert plots == ["rouge_per_round.png"]  # the sweep's prediction file is missing: no sweep plot
    assert "| fedpt, distilled expert | 2.0 | s1 | predictions missing |" in text


def test_the_two_experts_are_compared_prompt_by_prompt(tmp_path):
    """The sweep's pre-distillation expert against the distilled one: the paired difference pooled
    over the sets, recomputed here with numpy from the same synthetic per-prompt scores."""
    folder = fake_experiment(tmp_path / "exp", systems=("fedpt",))
    rng = np.random.default_rng(3)
    sweep, diffs = {"fedpt": {}, "fedpt:aggregated": {}}, {}
    for alpha, gap in (("0.5", 0.0), ("1.5", 4.0)):  # alpha 1.0 is the run's own (round-0002 proxy files)
        for set_name in SETS:
            base = rng.uniform(10, 60, N)
            distilled, aggregated = base + rng.normal(0, 1, N), base + gap + rng.normal(0, 1, N)
            _write(folder / "fedpt" / "predictions" / f"round-0002.{set_name}.proxy-alpha{alpha}.jsonl", distilled)
            _write(folder / "fedpt" / "predictions" / f"round-0002.{set_name}.proxy-aggregated-alpha{alpha}.jsonl",
                   aggregated)
            sweep["fedpt"].setdefault(alpha, {})[set_name] = float(distilled.mean())
            sweep["fedpt:aggregated"].setdefault(alpha, {})[set_name] = float(aggregated.mean())
            diffs.setdefault(alpha, []).extend(aggregated - distilled)
    (folder / "alpha_sweep.json").write_text(json.dumps(sweep))
    text, plots = render(folder, tmp_path / "docs" / "results.md")
    section = text.split("### Which expert should steer the large LM")[1].split("\n#")[0]
    rows = {line.split(" | ")[1]: line for line in section.splitlines() if line.startswith("| fedpt | ")}
    assert set(rows) == {"0.5", "1.5"}
    for alpha, values in diffs.items():
        assert f"| {2 * N} | " in rows[alpha]  # both sets pooled
        assert f" {np.mean(values):+.2f} [" in rows[alpha]
    assert rows["0.5"].endswith("| not distinguishable at this size |")
    assert rows["1.5"].endswith("| pre-distillation expert higher than distilled expert |")
    assert "| fedpt, pre-distillation expert | 1.5 | s2 | " in text
    assert plots == ["rouge_per_round.png", "alpha_sweep.png"]


def test_report_is_deterministic_and_quick_at_paper_size(tmp_path):
    """paper-cpu's size: 3 sets x 100 prompts, every system; text and PNG bytes repeat exactly."""
    folder = fake_experiment(tmp_path / "exp", prompts=100, sets=("dolly-15k", "self-instruct", "sni"))
    started = time.perf_counter()
    first = write_report(folder, tmp_path / "a" / "results.md")
    assert time.perf_counter() - started < 60
    second = write_report(folder, tmp_path / "b" / "results.md")
    assert first.read_text() == second.read_text()
    for name in ("rouge_per_round.png",):
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()
        assert b"Matplotlib" not in (first.parent / name).read_bytes()  # no software version in the PNG


def test_report_check_flags_a_stale_page(tmp_path, capsys):
    folder = fake_experiment(tmp_path / "exp", systems=("fedavg-large",))
    out = tmp_path / "results.md"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    assert main(["report", str(folder), "--out", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("fedavg-large", "fedavg-LARGE", 1))  # a hand edit
    assert main(["report", str(folder), "--out", str(out), "--check"]) == 1
    assert "differs from the report" in capsys.readouterr().err


def test_plots_are_written_without_software_metadata(tmp_path):
    from fedpt.report import Folder, round_intervals, sweep_values

    folder = Folder.read(fake_experiment(tmp_path / "exp"))
    make_plots(tmp_path, folder, sweep_values(folder), round_intervals(folder.path, folder.records),
               ["rouge_per_round.png"])
    assert (tmp_path / "rouge_per_round.png").stat().st_size > 10_000


def test_the_pre_distillation_proxy_is_held_against_the_final_models(tmp_path):
    """At the run's own alpha the pre-distillation proxy is compared, prompt by prompt on the swept
    prompts only (``eval.sweep_size``), with the models a user could ship instead; each difference
    is recomputed here with numpy from the synthetic files."""
    folder = fake_experiment(tmp_path / "exp")
    cfg = load_config(folder / "config.toml", overrides=["eval.sweep_size=25"])
    cfg.save(folder / "config.toml")
    rng = np.random.default_rng(5)
    sweep, ours = {"fedpt:aggregated": {"1.0": {}}}, {}
    for set_name in SETS:
        scores = rng.uniform(20, 70, N)
        _write(folder / "fedpt" / "predictions" / f"round-0002.{set_name}.proxy-aggregated-alpha1.jsonl", scores)
        sweep["fedpt:aggregated"]["1.0"][set_name] = float(scores[:25].mean())
        ours[set_name] = scores[:25]
    (folder / "alpha_sweep.json").write_text(json.dumps(sweep))

    def reference(path_of_set) -> np.ndarray:
        return np.concatenate([[json.loads(line)["rouge_l"] for line in path_of_set(s).read_text().splitlines()][:25]
                               for s in SETS])

    expected = {
        "FedPT's proxy (distilled expert)": lambda s: folder / "fedpt/predictions" / f"round-0002.{s}.proxy.jsonl",
        "pretrained large": lambda s: folder / "fedpt/predictions" / f"round-0000.{s}.pretrained-large.jsonl",
        "FedAvg-large": lambda s: folder / "fedavg-large/predictions" / f"round-0002.{s}.large.jsonl",
        "FedAvg+PT proxy": lambda s: folder / "fedavg-pt/predictions" / f"round-0002.{s}.proxy.jsonl",
    }
    text, _ = render(folder, tmp_path / "docs" / "results.md")
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| fedpt | ")
            and line.split(" | ")[2] == "50"}
    ours_all = np.concatenate([ours[s] for s in SETS])
    for label, path_of_set in expected.items():
        theirs = reference(path_of_set)
        assert f"| {ours_all.mean():.2f} | {theirs.mean():.2f} | {np.mean(ours_all - theirs):+.2f} [" in rows[label]
    assert "FedPT's distilled small" in rows  # fedpt small: the by-product
    # fedpt's pre-distillation proxy is far above the -3 of the distilled small (scores 20-70 vs 10-60 - 3)
    assert rows["FedPT's distilled small"].endswith("| pre-distillation proxy higher than FedPT's distilled small |")
