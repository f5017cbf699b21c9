"""Every Rouge-L a run reports is recomputed from its saved predictions with rouge_score alone.

A tiny ``fedpt experiment`` under the sampling protocol (2 seeds) writes rounds.jsonl,
summary.json and results.md; every number in them must equal the mean of the per-prompt scores
this test computes itself (its own ``RougeScorer``, not fedpt's) from the prediction files.
The same run is the "shared" side of the FedAvg+PT / FedAvg-small sharing test, and the run
that ``fedpt eval`` scores a user's JSONL file against.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer
from safetensors.torch import load_file

from fedpt.cli import main

from .conftest import FAST

SEEDS = [10, 20]
SAMPLING = ["--set", "eval.protocol='sampling'", "--set", f"eval.seeds={SEEDS}"]
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # the test's own scorer
EXACT = 1e-9  # recomputed means vs stored floats
PRINTED = 0.005 + 1e-9  # vs numbers printed with 2 decimals


def model_file(run: Path, system: str, rnd: int, set_name: str, role: str) -> Path:
    """The documented file naming, written out independently of fedpt.predictions."""
    model = ("pretrained-small" if role == "small" else "pretrained-large") if rnd == 0 else role
    return run / system / "predictions" / f"round-{rnd:04d}.{set_name}.{model}.jsonl"


def recompute(path: Path, first: int | None = None) -> tuple[float, dict[str, float]]:
    """(mean Rouge-L x100, {id: seed-averaged score}) from a prediction file, with our own scorer."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    per_id: dict[str, list[float]] = {}
    for row in rows:
        mine = 100 * max(SCORER.score(ref, row["prediction"])["rougeL"].fmeasure for ref in row["references"])
        assert abs(mine - row["rouge_l"]) < EXACT, (path, row["id"])
        per_id.setdefault(row["id"], []).append(mine)
    ids = list(per_id)[:first]
    per_prompt = {pid: sum(per_id[pid]) / len(per_id[pid]) for pid in ids}
    return sum(per_prompt.values()) / len(per_prompt), per_prompt


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("traceable") / "exp"
    assert main(["experiment", "--preset", "tiny", "--no-progress", "--out", str(out), "--alphas", "0,1",
                 *FAST, *SAMPLING]) == 0
    return out


@pytest.mark.slow
def test_every_rouge_l_is_recomputable_from_the_predictions(experiment):
    run = experiment
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    checked = 0
    # rounds.jsonl: every set and model of every round
    for row in rows:
        for set_name, roles in row["rougeL_sets"].items():
            for role, value in roles.items():
                path = model_file(run, row["system"], row["round"], set_name, role)
                lines = [json.loads(line) for line in path.read_text().splitlines()]
                assert sorted({r["seed"] for r in lines}) == SEEDS
                assert len(lines) == len(SEEDS) * summary["eval_sets"][set_name]  # one row per prompt and seed
                assert abs(recompute(path)[0] - value) < EXACT
                checked += 1
    assert checked == 6 + 3 + 6 + 3  # rounds 0-2 x (fedpt, fedavg-pt: small + proxy; fedavg-small, fedavg-large: one)
    # summary.json: pretrained and final records, their intervals, the comparisons
    for name, info in summary["systems"].items():
        for which in ("pretrained", "final"):
            for set_name, roles in info[which]["rougeL_sets"].items():
                for role, value in roles.items():
                    mean, _ = recompute(model_file(run, name, info[which]["round"], set_name, role))
                    assert abs(mean - value) < EXACT
                    interval = info["ci"][which][set_name][role]
                    assert abs(interval["estimate"] - mean) < EXACT and interval["low"] <= mean <= interval["high"]
    finals = {name: info["final"]["round"] for name, info in summary["systems"].items()}
    assert summary["comparisons"]
    for comparison in summary["comparisons"]:
        sides = []
        for label in (comparison["a"], comparison["b"]):
            system, model = label.split(" ")
            rnd = 0 if model.startswith("pretrained-") else finals[system]
            role = {"pretrained-small": "small", "pretrained-large": "large"}.get(model, model)
            sets = [comparison["set"]] if comparison["set"] != "all sets" else list(summary["eval_sets"])
            scores = {}
            for set_name in sets:
                scores |= {f"{set_name}/{k}": v for k, v in recompute(model_file(run, system, rnd, set_name, role))[1].items()}
            sides.append(scores)
        a, b = sides
        assert abs(comparison["a_rouge_l"] - sum(a.values()) / len(a)) < EXACT
        assert abs(comparison["b_rouge_l"] - sum(b.values()) / len(b)) < EXACT
        assert abs(comparison["diff_estimate"] - sum(a[k] - b[k] for k in a) / len(a)) < EXACT
    # results.md: every table row names its file; the headline block and the comparisons too
    results = (run / "results.md").read_text()
    table_rows = re.findall(r"^\| (\S+) \| (\d+) \| (\S+) \| (\S+) \| ([\d.]+) \| \[[^]]*\] \| (\S+) \|$", results, re.M)
    sweep_rows = re.findall(r"^\| (fedpt, [a-z-]+ expert) \| ([\d.]+) \| (\S+) \| ([\d.]+) \| \[[^]]*\] \| (\S+) \|$",
                            results, re.M)
    assert len(table_rows) == checked
    for system, rnd, set_name, model, value, path in table_rows:
        assert (run / path) == model_file(run, system, int(rnd), set_name, model.replace("pretrained-", ""))
        assert abs(recompute(run / path)[0] - float(value)) < PRINTED
    assert {(s, a) for s, a, *_ in sweep_rows} == {(f"fedpt, {expert} expert", alpha) for alpha in ("0.0", "1.0")
                                                   for expert in ("distilled", "pre-distillation")}
    for system, alpha, set_name, value, path in sweep_rows:
        assert abs(recompute(run / path)[0] - float(value)) < PRINTED
    headline = results.split("```")[1].splitlines()
    cells = 0
    for line in headline:
        system, set_name = line[:14].strip(), line[14:30].strip()
        if system not in summary["systems"]:
            continue
        texts = re.findall(r"(?:^|\s)(-|\d+\.\d\d \[[^]]*\])", line[30:])
        assert len(texts) == 5, line
        for text, (rnd, role) in zip(texts, [(0, "small"), (0, "large"), (None, "small"), (None, "proxy"),
                                             (None, "large")]):
            text = text.split("[")[0].strip()
            if text != "-":
                path = model_file(run, system, finals[system] if rnd is None else 0, set_name, role)
                assert abs(recompute(path)[0] - float(text)) < PRINTED, (line, role)
                cells += 1
    assert cells >= 10
    comparison_rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([-+\d.]+) \|",
                                 results, re.M)
    assert len(comparison_rows) == len(summary["comparisons"])
    for (label, set_name, a, b, va, vb, diff), row in zip(comparison_rows, summary["comparisons"]):
        assert (label, set_name) == (row["comparison"], row["set"])
        assert abs(float(va) - row["a_rouge_l"]) < PRINTED and abs(float(diff) - row["diff_estimate"]) < PRINTED


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_shared_device_rounds_equal_a_separate_run(experiment, tmp_path):
    """FedAvg+PT trained alone gives the same adapter, losses and predictions as when it shares
    FedAvg-small's device rounds in the experiment (and the experiment really shared them)."""
    alone = tmp_path / "alone"
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(alone), "--system", "fedavg-pt",
                 *FAST, *SAMPLING]) == 0
    shared = [json.loads(line) for line in (experiment / "rounds.jsonl").read_text().splitlines()]
    separate = [json.loads(line) for line in (alone / "rounds.jsonl").read_text().splitlines()]
    keys = ("round", "train_loss", "clients", "bytes_up", "rougeL_small", "rougeL_proxy", "rougeL_sets")
    pt = [{k: r[k] for k in keys} for r in shared if r["system"] == "fedavg-pt"]
    assert pt == [{k: r[k] for k in keys} for r in separate]
    a = load_file(experiment / "fedavg-pt" / "adapter" / "adapter_model.safetensors")
    b = load_file(alone / "fedavg-pt" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for path in (alone / "fedavg-pt" / "predictions").iterdir():
        assert _digest(path) == _digest(experiment / "fedavg-pt" / "predictions" / path.name), path.name
    # Shared, not trained twice: fedavg-small's records carry the very same round (timings to the
    # microsecond, which two trainings never reproduce) and its adapter is the same tensor values.
    small = {r["round"]: r for r in shared if r["system"] == "fedavg-small"}
    for r in shared:
        if r["system"] == "fedavg-pt" and r["round"] > 0:
            assert (small[r["round"]]["seconds"], small[r["round"]]["device_train_seconds"]) == \
                   (r["seconds"], r["device_train_seconds"])
    c = load_file(experiment / "fedavg-small" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_fedpt_eval_on_a_user_jsonl_file(experiment, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    questions = [("What is the capital of France?", "Paris is the capital of France."),
                 ("Name a primary color.", "Red is a primary color."),
                 ("What do bees make?", "Bees make honey."),
                 ("How many legs does a spider have?", "A spider has eight legs."),
                 ("What is frozen water called?", "Frozen water is called ice.")]
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in questions))
    before = {p: _digest(experiment / p) for p in ("rounds.jsonl", "summary.json", "results.md")}
    args = ["eval", "--run", str(experiment), "--data", str(data), "--set", "data.fields=['instruction=question',"
            "'response=answer']", "--set", "eval.protocol='greedy'", "--name", "mine"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    out = experiment / "evals" / "mine"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_sets"] == {"mine": 5} and summary["eval_protocol"].startswith("greedy")
    assert "mine" in printed and (out / "table.txt").read_text().strip() == printed.split("\nresults:")[0].strip()
    finals = {name: info["final"]["round"] for name, info in summary["systems"].items()}
    assert set(finals) == {"fedpt", "fedavg-small", "fedavg-large", "fedavg-pt"}
    for name, info in summary["systems"].items():
        for which in ("pretrained", "final"):
            for role, value in info[which]["rougeL_sets"]["mine"].items():
                path = model_file(out, name, info[which]["round"], "mine", role)
                rows = [json.loads(line) for line in path.read_text().splitlines()]
                assert [r["prompt"].split("### Instruction:\n")[1].split("\n")[0] for r in rows] == [q for q, _ in questions]
                assert [r["references"] for r in rows] == [[a] for _, a in questions]
                assert abs(recompute(path)[0] - value) < EXACT
    assert {p: _digest(experiment / p) for p in before} == before  # training results untouched
    assert main(args) == 2  # never over an earlier evaluation
    assert "already holds an evaluation" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--run", "{tmp}/none"], "not a fedpt run directory"),
    (["--run", "{run}", "--set", "train.lr=1"], "fedpt eval only takes --set eval"),
    (["--run", "{run}", "--set", "eval.protocol='beam'"], "eval.protocol"),
    (["--run", "{run}", "--system", "fedsgd"], "unknown system 'fedsgd'"),
    (["--run", "{run}", "--system", "fedavg-large"], "has no system 'fedavg-large'"),
    (["--run", "{run}", "--model", "large"], "does not exist for it"),
    (["--run", "{run}", "--model", "huge"], "unknown --model 'huge'"),
    (["--run", "{run}", "--data", "{tmp}/missing.jsonl"], "does not exist"),
    (["--run", "{run}", "--data", "{tmp}/broken.jsonl"], "broken.jsonl:2: not valid JSON"),
    (["--run", "{run}", "--name", "a/b"], "--name must be a plain folder name"),
])
def test_fedpt_eval_bad_input_is_one_line(tmp_path, capsys, args, message):
    """Checked before any model loads (a fake finished run suffices)."""
    run = tmp_path / "run"
    (run / "fedpt" / "adapter").mkdir(parents=True)
    (run / "fedpt" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    from fedpt.config import load_config

    load_config(preset="tiny", overrides=["run.systems=['fedpt']"]).save(run / "config.toml")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "response": "b"}\n{"instruction": \n')
    filled = [a.format(tmp=tmp_path, run=run) for a in args]
    assert main(["eval", *filled]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (run / "evals").exists() or not any((run / "evals").iterdir())
