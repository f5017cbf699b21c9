"""Checkpoints and resume: a run stopped after a round and resumed ends exactly like an uninterrupted one.

Runs killed or signalled at named points and resumed: tests/test_resume_signals.py.
"""

import pytest
import torch

from fedpt.checkpoint import load_checkpoint, save_checkpoint
from fedpt.cli import main
from fedpt.errors import FedPTError

from .conftest import RESUME_RUN, assert_same_run


def test_checkpoint_round_trip_and_corruption(tmp_path):
    state = {"a.lora_A.weight": torch.randn(4, 3), "a.lora_B.weight": torch.zeros(3, 4)}
    for rnd in (1, 2, 3):
        save_checkpoint(tmp_path, rnd, {k: v + rnd for k, v in state.items()})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 3 and torch.equal(ckpt.adapter["a.lora_A.weight"], state["a.lora_A.weight"] + 3)
    assert sorted(p.name for p in tmp_path.glob("round-*")) == ["round-0002", "round-0003"]  # keeps 2
    with (tmp_path / "round-0003" / "adapter.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(FedPTError, match="corrupt or incomplete"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "none") is None


def test_a_failing_server_step_fails_the_round_and_the_run_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "failed"
    monkeypatch.setenv("FEDPT_FAIL_AT", "distillation@2")
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *RESUME_RUN]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: round 2: proxy-tuning + distillation failed: InjectedFault")
    assert err[0].endswith(f"the last checkpoint is intact: fedpt run --resume {out}")
    assert load_checkpoint(out / "fedpt" / "checkpoints").round == 1  # the last good round is intact
    monkeypatch.delenv("FEDPT_FAIL_AT")
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_resume_after_a_stop_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    full, cut = uninterrupted, tmp_path / "cut"
    # A run stopped after round 1 of 3: run 1 round, then make its config say 3 (as it was).
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(cut), *RESUME_RUN,
                 "--set", "federation.rounds=1"]) == 0
    config = (cut / "config.toml").read_text()
    assert config.count("rounds = 1\n") == 1
    (cut / "config.toml").write_text(config.replace("rounds = 1\n", "rounds = 3\n"))
    assert main(["run", "--no-progress", "--resume", str(cut)]) == 0
    # Bit-identical: replies are aggregated in a fixed order and MKL runs alignment-independent.
    assert_same_run(full, cut)


def test_resume_refuses_a_changed_config(tmp_path, capsys):
    from fedpt.checkpoint import config_changes

    assert config_changes({"train": {"lr": 1e-3}, "federation": {"rounds": 1}},
                          {"train": {"lr": 2e-3}, "federation": {"rounds": 3}}) == ["train.lr"]
    from fedpt.config import load_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    load_config(preset="tiny", overrides=["train.lr=0.5"]).save(run_dir / "config.toml")  # edited after the fact
    original = load_config(preset="tiny").to_dict()
    save_checkpoint(run_dir / "fedpt" / "checkpoints", 1, {"w": torch.zeros(2)}, original)
    before = sorted(p.name for p in run_dir.rglob("*"))
    assert main(["run", "--no-progress", "--resume", str(run_dir)]) == 2
    assert "written with a different config (train.lr changed)" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # nothing touched


def test_resume_refuses_other_flags(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--set", "train.lr=1"]) == 2
    assert "--resume DIR takes the run's own config" in capsys.readouterr().err
