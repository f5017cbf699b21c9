"""``federation.target_rouge_l`` stops the proxy systems (and resume respects it); a resumed round
rewrites its prediction files so they always match rounds.jsonl."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpt.checkpoint import load_checkpoint
from fedpt.cli import main
from fedpt.config import load_config
from fedpt.systems import target_met

from .conftest import FAST
from .test_traceable import model_file, recompute


def _rows(out):
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def test_target_met_reads_the_proxy_of_the_last_round():
    cfg = load_config(preset="tiny", overrides=["federation.target_rouge_l=20.0"])
    rows = [{"round": 0, "rougeL_proxy": 25.0}, {"round": 1, "rougeL_proxy": 19.9}]
    assert not target_met(cfg, "fedpt", rows)  # round 0 never counts, and 19.9 < 20
    assert target_met(cfg, "fedpt", rows + [{"round": 2, "rougeL_proxy": 20.0}])
    assert not target_met(cfg, "fedavg-small", [{"round": 2, "rougeL_proxy": 30.0}])  # no proxy-tuned LM
    assert not target_met(load_config(preset="tiny"), "fedpt", rows + [{"round": 2, "rougeL_proxy": 90.0}])  # off


@pytest.mark.slow
def test_target_rouge_l_stops_proxy_systems_and_resume_keeps_them_stopped(tmp_path, capsys):
    out = tmp_path / "target"
    # The tiny pair's proxy scores ~9 on this set: a target of 1 is met after round 1.
    args = ["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST, "--set", "federation.rounds=3",
            "--set", "federation.target_rouge_l=1.0", "--set", "run.systems=['fedpt','fedavg-small','fedavg-pt']"]
    assert main(args) == 0
    rows = _rows(out)
    rounds = {s: [r["round"] for r in rows if r["system"] == s] for s in ("fedpt", "fedavg-small", "fedavg-pt")}
    assert rounds == {"fedpt": [0, 1], "fedavg-pt": [0, 1], "fedavg-small": [0, 1, 2, 3]}
    assert all(r["rougeL_proxy"] >= 1.0 for r in rows if r["round"] == 1 and r["system"] != "fedavg-small")
    summary = json.loads((out / "summary.json").read_text())
    info = summary["systems"]
    assert (info["fedpt"]["rounds_run"], info["fedpt"]["target_rouge_l"]) == (1, {"target": 1.0, "reached": True})
    assert info["fedavg-pt"]["target_rouge_l"]["reached"] and info["fedavg-pt"]["rounds_run"] == 1
    assert info["fedavg-small"]["rounds_run"] == 3 and not info["fedavg-small"]["target_rouge_l"]["reached"]
    assert "target Rouge-L: fedpt reached (1, 1 rounds)" in capsys.readouterr().out
    # fedavg-pt's adapter is its round-1 adapter, not the shared group's last one
    pt = load_file(out / "fedavg-pt" / "adapter" / "adapter_model.safetensors")
    at_stop = load_checkpoint(out / "fedavg-pt" / "checkpoints")
    assert at_stop.round == 1 and all(torch.equal(pt[k], at_stop.adapter[k]) for k in at_stop.adapter)
    small = load_file(out / "fedavg-small" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(pt[k], small[k]) for k in pt)
    before = sorted(_rows(out), key=lambda r: (r["system"], r["round"]))
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    # stopped systems stay stopped, nothing is retrained (rows regroup by system on resume: order is not data)
    assert sorted(_rows(out), key=lambda r: (r["system"], r["round"])) == before


@pytest.mark.slow
def test_a_resumed_round_rewrites_its_predictions(tmp_path, monkeypatch, capsys):
    out = tmp_path / "failed"
    monkeypatch.setenv("FEDPT_FAIL_AT", "evaluation@2")  # after round 2's small LM is scored and saved
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST,
                 "--set", "run.systems=['fedpt']"]) == 2
    small = model_file(out, "fedpt", 2, "dolly-tiny", "small")
    assert small.is_file() and not model_file(out, "fedpt", 2, "dolly-tiny", "proxy").exists()
    small.write_text(json.dumps({"id": "x", "prediction": "stale", "references": ["stale"], "rouge_l": 100.0,
                                 "seed": None}) + "\n")
    stray = model_file(out, "fedpt", 3, "dolly-tiny", "proxy")
    stray.write_text("")  # a later round's file from some earlier attempt: not this run's any more
    monkeypatch.delenv("FEDPT_FAIL_AT")
    capsys.readouterr()
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    assert not stray.exists()
    for row in _rows(out):
        for set_name, roles in row["rougeL_sets"].items():
            for role, value in roles.items():
                assert abs(recompute(model_file(out, row["system"], row["round"], set_name, role))[0] - value) < 1e-9
    assert len(small.read_text().splitlines()) == 8  # eval_size prompts, greedy: one row each
