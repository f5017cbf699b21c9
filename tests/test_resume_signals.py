"""A run stopped by a signal at a named point and resumed ends bit-identical to one never stopped.

SIGKILL (``FEDPT_KILL_AT=<point>@<round>``: the server kills itself there, as an OOM killer or a
pulled plug would) and SIGTERM (``FEDPT_PAUSE_AT``: the run waits at the point and the test sends
the signal, as systemd, Docker and Slurm do). Each test stops one run at every point in turn —
the first stop in a fresh run, each later one in the resume of the stop before — and resumes it to
the end: every resume starts from what a stop left behind, and each stop is checked where it
happened (the checkpoint it kept, the torn write it left, the processes it ended). One chain per
signal rather than one run per point: each run of the tiny preset is mostly process, Ray and import
start-up, and the chain starts half as many.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedpt.cli import main

from .conftest import RESUME_RUN, assert_same_run

pytestmark = pytest.mark.slow


def _child(out, env: dict[str, str], resume: bool) -> subprocess.Popen:
    """``fedpt run`` (or ``--resume``) in its own session, so that the test can reap Ray with it."""
    args = ["--resume", str(out)] if resume else ["--preset", "tiny", "--out", str(out), *RESUME_RUN]
    return subprocess.Popen([sys.executable, "-m", "fedpt.cli", "run", "--no-progress", *args],
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _reap(proc: subprocess.Popen) -> None:
    try:  # Ray's helper processes outlive a SIGKILLed driver: end the child's whole session
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _latest(out) -> int:
    latest = out / "fedpt" / "checkpoints" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.is_file() else 0


# In the order a run meets them; each kill costs the round in progress and keeps the one before.
# Evaluation last, in round 3: the final resume redoes only that round, and its profile shows
# what the eval cache saved (every evaluation before it is cached by the stops before).
KILLS = [("device-training@2", 1), ("distillation@2", 1), ("checkpoint-write@2", 1), ("checkpoint-publish@2", 1),
         ("evaluation@3", 2)]


def test_sigkill_at_each_named_point_then_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    checkpoints = out / "fedpt" / "checkpoints"
    for i, (kill_at, kept) in enumerate(KILLS):
        proc = _child(out, {"FEDPT_KILL_AT": kill_at}, resume=i > 0)
        try:
            _, err = proc.communicate(timeout=600)
        finally:
            _reap(proc)
        assert proc.returncode == -signal.SIGKILL, (kill_at, err.decode()[-2000:])
        assert _latest(out) == kept, kill_at
        torn = list(checkpoints.glob(".round-*"))
        assert len(torn) == (kill_at == "checkpoint-write@2"), (kill_at, torn)  # killed mid-write: a torn copy
        if kill_at == "checkpoint-publish@2":  # complete on disk, but `latest` still names round 1
            assert (checkpoints / "round-0002" / "meta.json").is_file()
    assert main(["run", "--no-progress", "--resume", str(out)]) == 0
    assert_same_run(uninterrupted, out)
    assert not list(checkpoints.glob(".round-*"))  # the torn write was cleaned up
    # Killed between round 3's small-LM and proxy evaluations: the redone round 3 trains the same
    # adapter, so its small-LM scores come from eval-cache/; only the proxy is decoded again.
    phases = json.loads((out / "profile.json").read_text())["phases"]
    assert phases.get("evaluation: small", {"calls": 0})["calls"] == 0
    assert phases["evaluation: proxy"]["calls"] == 1


STOP_LIMIT = 30.0  # seconds from SIGTERM to the last process of the run gone (issue 17)

# Where the run waits for the signal: the server (evaluation, distillation) or a device.
PAUSES = ["evaluation@2", "device-training@2", "distillation@2"]


def test_sigterm_at_each_named_point_stops_everything_then_resume_is_bit_identical(uninterrupted, tmp_path):
    """``kill PID`` (SIGTERM to the main process only) while the run is paused at a named point
    (``FEDPT_PAUSE_AT``: the signal lands there however fast the machine): every process the run
    started is gone within STOP_LIMIT, the last line says how to resume, and the run resumed after
    the last stop ends bit-identical to an uninterrupted one."""
    import psutil

    out = tmp_path / "stopped"
    for i, point in enumerate(PAUSES):
        marker = tmp_path / f"paused-{i}"
        proc = _child(out, {"FEDPT_PAUSE_AT": point, "FEDPT_PAUSE_FILE": str(marker)}, resume=i > 0)
        try:
            while not marker.is_file():  # no timer: the run says when it is there
                assert proc.poll() is None, (point, proc.stderr.read().decode()[-2000:])
                time.sleep(0.2)
            started = psutil.Process(proc.pid).children(recursive=True)  # Ray's GCS, raylet, workers, ...
            assert len(started) >= 3, point
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_LIMIT
            _, err = proc.communicate(timeout=STOP_LIMIT)
            while (left := _running(proc.pid, started)) and time.monotonic() < deadline:
                time.sleep(0.2)  # orphans exit on their own (init reaps them): gone in time is what counts
        finally:
            _reap(proc)  # whatever the verdict, leave nothing behind for the next stop or test
        assert proc.returncode == 128 + signal.SIGTERM, (point, err.decode()[-2000:])
        assert not left, (point, left)
        assert err.decode().strip().splitlines()[-1] == f"stopped by SIGTERM; resume with: fedpt run --resume {out}"
        assert _latest(out) == 1, point  # round 2 was in progress
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
