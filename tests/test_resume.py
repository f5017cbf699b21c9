"""Checkpoints and resume: a run stopped after a round and resumed ends exactly like an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpt.checkpoint import load_checkpoint, save_checkpoint
from fedpt.cli import main
from fedpt.errors import FedPTError

from .conftest import FAST as FAST_TINY

FAST = [*FAST_TINY, "--set", "run.systems=['fedpt']", "--set", "federation.rounds=3"]


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


@pytest.mark.slow
def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(full), *FAST]) == 0
    # A run stopped after round 1 of 3: run 1 round, then make its config say 3 (as it was).
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(cut), *FAST,
                 "--set", "federation.rounds=1"]) == 0
    config = (cut / "config.toml").read_text()
    assert config.count("rounds = 1\n") == 1
    (cut / "config.toml").write_text(config.replace("rounds = 1\n", "rounds = 3\n"))
    assert main(["run", "--no-progress", "--resume", str(cut)]) == 0
    rows = [json.loads(line) for line in (full / "rounds.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (cut / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    # Bit-identical: replies are aggregated in a fixed order and MKL runs alignment-independent.
    keys = ("train_loss", "kd_loss", "kd_kl_before", "kd_kl_after", "rougeL_small", "rougeL_proxy", "bytes_up")
    for a, b in zip(rows, resumed):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["round"]
    a = load_file(full / "fedpt" / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "fedpt" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_flags(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--set", "train.lr=1"]) == 2
    assert "--resume DIR takes the run's own config" in capsys.readouterr().err
