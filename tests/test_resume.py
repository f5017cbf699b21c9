"""Checkpoints and resume: a run stopped after a round and resumed ends exactly like an uninterrupted one.

Kill tests: the run is a separate process sent SIGKILL at a named point of round 2 or 3
(``FEDPT_KILL_AT``), or SIGTERM while it waits at a named point (``FEDPT_PAUSE_AT``), then
resumed; the final adapter and every round's metrics must equal an uninterrupted run's to the bit.
"""

import json
import os
import signal
import subprocess
import sys
import time

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


KEYS = ("train_loss", "kd_loss", "kd_kl_before", "kd_kl_after", "rougeL_small", "rougeL_proxy", "bytes_up",
        "clients", "failures")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same 3-round run, never stopped."""
    full = tmp_path_factory.mktemp("full")
    assert main(["run", "--preset", "tiny", "--no-progress", "--overwrite", "--out", str(full), *FAST]) == 0
    return full


def assert_same_run(full, resumed_dir):
    """Bit-identical: every round's metrics and the final adapter."""
    rows = [json.loads(line) for line in (full / "rounds.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (resumed_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(rows, resumed):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, a["round"]
    a = load_file(full / "fedpt" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "fedpt" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _killed_run(out, kill_at: str) -> int:
    """Run in a child process that SIGKILLs itself at ``kill_at``; returns the last checkpointed round."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDPT_KILL_AT": kill_at}
    proc = subprocess.Popen([sys.executable, "-m", "fedpt.cli", "run", "--preset", "tiny", "--no-progress",
                             "--out", str(out), *FAST], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        try:  # Ray's helper processes outlive a SIGKILLed driver: reap its whole session
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    latest = out / "fedpt" / "checkpoints" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["device-training@2", "distillation@2", "evaluation@2", "checkpoint-write@2",
                                     "checkpoint-publish@3"])
def test_sigkill_at_a_named_point_then_resume_is_bit_identical(uninterrupted, tmp_path, kill_at):
    out = tmp_path / "killed"
    saved = _killed_run(out, kill_at=kill_at)
    point, rnd = kill_at.split("@")
    assert saved == int(rnd) - 1  # the round in progress was lost, the one before it kept
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    assert_same_run(uninterrupted, out)
    assert not list((out / "fedpt" / "checkpoints").glob(".round-*"))  # a torn write is cleaned up
    if point == "evaluation":
        # Killed between round 2's small-LM and proxy evaluations: the redone round 2 trains the
        # same adapter, so its small-LM scores come from eval-cache/; only round 3's are decoded.
        phases = json.loads((out / "profile.json").read_text())["phases"]
        assert phases["evaluation: small"]["calls"] == 1
        assert phases["evaluation: proxy"]["calls"] == 2


STOP_LIMIT = 30.0  # seconds from SIGTERM to the last process of the run gone (issue 17)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["evaluation@2", "device-training@2", "distillation@2"])
def test_sigterm_at_a_named_point_stops_everything_then_resume_is_bit_identical(uninterrupted, tmp_path, point):
    """``kill PID`` (SIGTERM to the main process only, as systemd, Docker and Slurm send it) while
    the run is paused at a named point (``FEDPT_PAUSE_AT``: the server, or for device training a
    device, waits there, so the signal lands there however fast the machine): every process the
    run started is gone within STOP_LIMIT, the last line says how to resume, and the resumed run
    ends bit-identical to an uninterrupted one."""
    import psutil

    out, marker = tmp_path / "stopped", tmp_path / "paused"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDPT_PAUSE_AT": point, "FEDPT_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "fedpt.cli", "run", "--preset", "tiny", "--no-progress",
                             "--out", str(out), *FAST], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not marker.is_file():  # no timer: the run says when it is there
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's GCS, raylet, workers, ...
        assert len(started) >= 3
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_LIMIT
        _, err = proc.communicate(timeout=STOP_LIMIT)
        while (left := _running(proc.pid, started)) and time.monotonic() < deadline:
            time.sleep(0.2)  # orphans exit on their own (init reaps them): gone in time is what counts
    finally:
        try:  # whatever the verdict, leave nothing behind for the next test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert not left, left
    assert err.decode().strip().splitlines()[-1] == f"stopped by SIGTERM; resume with: fedpt run --resume {out}"
    assert int((out / "fedpt" / "checkpoints" / "latest").read_text().split("-")[1]) == 1  # round 2 was in progress
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    assert_same_run(uninterrupted, out)


def _running(group: int, started) -> list[str]:
    """Processes of the run's group, or started by it, that are still alive (zombies count as gone)."""
    import psutil

    alive = []
    for p in {*started, *psutil.process_iter()}:
        try:
            if (p in started or os.getpgid(p.pid) == group) and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except (psutil.Error, ProcessLookupError):
            pass
    return alive


def test_a_failing_server_step_fails_the_round_and_the_run_resumes(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "failed"
    monkeypatch.setenv("FEDPT_FAIL_AT", "distillation@2")
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST]) == 2
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
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(cut), *FAST,
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
