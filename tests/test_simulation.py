"""End to end: every system as a real Flower simulation (Ray actors as devices), then `fedpt generate`."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from fedpt.cli import main

from .conftest import FAST



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fedpt_home):
    out = tmp_path_factory.mktemp("sim") / "run"
    assert main(["run", "--preset", "tiny", "--system", "all", "--no-progress", "--out", str(out), *FAST]) == 0
    return out


def _pretrained_scores(run_dir: Path) -> dict[str, float]:
    """Rouge-L of the plain small and large models on the run's first evaluation set."""
    from fedpt.config import load_config
    from fedpt.evaluate import evaluate_rouge
    from fedpt.models.loading import load_model, load_tokenizer
    from fedpt.models.logits import LocalLogitSource
    from fedpt.server import load_eval_sets, load_splits

    cfg = load_config(path=run_dir / "config.toml")
    tokenizer = load_tokenizer(cfg.model.small)
    examples = next(iter(load_eval_sets(cfg, load_splits(cfg)).values()))
    return {role: evaluate_rouge(LocalLogitSource(load_model(spec, cfg.model.dtype)), tokenizer, examples, cfg.eval,
                                 cfg.data).rouge_l
            for role, spec in (("small", cfg.model.small), ("large", cfg.model.large))}


@pytest.mark.slow
def test_all_systems_two_rounds(finished_run, capsys):
    rows = [json.loads(line) for line in (finished_run / "rounds.jsonl").read_text().splitlines()]
    # Every system, every round, once (fedavg-small and fedavg-pt share device rounds, so their
    # records interleave in the log).
    assert sorted((r["system"], r["round"]) for r in rows) == sorted(
        (s, i) for s in ("fedpt", "fedavg-small", "fedavg-large", "fedavg-pt") for i in (0, 1, 2))
    by = {(r["system"], r["round"]): r for r in rows}
    # Round 0 is the pretrained pair (identity adapters): the run scores each model once and
    # shares the result between systems, so check every system's round 0 against a fresh
    # evaluation of the plain models, outside the run.
    pretrained = _pretrained_scores(finished_run)
    assert pretrained["small"] != pretrained["large"]  # a mix-up between the two would show
    for system, role, key in (("fedpt", "small", "rougeL_small"), ("fedpt", "large", "rougeL_proxy"),
                              ("fedavg-small", "small", "rougeL_small"), ("fedavg-large", "large", "rougeL_large"),
                              ("fedavg-pt", "small", "rougeL_small"), ("fedavg-pt", "large", "rougeL_proxy")):
        assert by[(system, 0)][key] == pretrained[role], (system, key)
    for (system, rnd), r in by.items():
        if rnd == 0:
            continue
        assert r["clients"] == 3 and r["failures"] == 0 and r["train_loss"] > 0
        assert r["bytes_up"] == r["bytes_down"] == 3 * r["bytes_up_per_device"] > 0
        assert (r["kd_kl_before"] is not None) == (system == "fedpt")
        assert (r["rougeL_proxy"] is not None) == (system in ("fedpt", "fedavg-pt"))
        assert (r["rougeL_large"] is not None) == (system == "fedavg-large")
    # Same data, seeds and starting adapter: the first round's device training is identical.
    assert by[("fedpt", 1)]["train_loss"] == by[("fedavg-small", 1)]["train_loss"] == by[("fedavg-pt", 1)]["train_loss"]
    # fedavg-pt and fedavg-small share step 1-3 exactly: same small model at every round.
    assert by[("fedavg-pt", 2)]["rougeL_small"] == by[("fedavg-small", 2)]["rougeL_small"]
    summary = json.loads((finished_run / "summary.json").read_text())
    assert set(summary["systems"]) == {"fedpt", "fedavg-small", "fedavg-large", "fedavg-pt"}
    for system in summary["systems"]:
        assert (finished_run / system / "adapter" / "adapter_model.safetensors").is_file()
    assert "[run]" in (finished_run / "config.toml").read_text()
    assert "| **total** |" in (finished_run / "partitions.md").read_text()
    assert (finished_run / "partitions.png").stat().st_size > 5_000


@pytest.mark.slow
def test_generate_alpha_zero_is_the_large_model(finished_run, capsys):
    capsys.readouterr()
    assert main(["generate", "--run", str(finished_run), "--alpha", "0", "Name a fruit."]) == 0
    alpha0 = capsys.readouterr().out
    assert main(["generate", "--run", str(finished_run), "--model", "large", "Name a fruit."]) == 0
    assert capsys.readouterr().out == alpha0
    assert main(["generate", "--run", str(finished_run), "--alpha", "2", "Name a fruit."]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.slow
def test_flwr_run_uses_the_same_apps(tmp_path, fedpt_home):
    """`flwr run .` (Flower's CLI, a SuperLink on loopback) drives the same ServerApp/ClientApp."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "flwr-out"
    run_config = f'preset="tiny" set="" systems="fedavg-pt" out="{out}" overwrite=true'  # the preset's 3 devices
    result = subprocess.run(["bash", str(root / "scripts" / "flwr-run-local.sh"), "3", run_config],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")})
    assert result.returncode == 0, result.stderr[-2000:]
    # `flwr run` exits 0 even when the ServerApp fails: its streamed log says why.
    assert (out / "rounds.jsonl").is_file(), result.stdout[-3000:]
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [(r["system"], r["round"]) for r in rows] == [("fedavg-pt", 0), ("fedavg-pt", 1), ("fedavg-pt", 2)]
    # The script stopped everything it started (and only that): no process carries its FLWR_HOME.
    from .test_deploy import processes_with_env

    assert processes_with_env("FLWR_HOME", str(tmp_path / "flwr-home")) == []
    assert rows[-1]["clients"] == 3 and rows[-1]["rougeL_proxy"] is not None


@pytest.mark.slow
def test_sampling_a_subset_of_devices_is_reproducible_across_runs(tmp_path):
    """2 of 3 devices per round: two runs (new random node ids each) train the same partitions."""
    rows = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST,
                     "--set", "run.systems=['fedavg-small']", "--set", "federation.clients_per_round=2"]) == 0
        rows.append([json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()])
    assert [r["clients"] for r in rows[0]] == [0, 2, 2]
    keys = ("train_loss", "bytes_up", "rougeL_small")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
