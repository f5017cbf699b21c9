"""One process per run directory: a second run is refused naming the holder; a killed holder's lock is taken over.

The holder is a real child process taking the lock through ``fedpt.runlock`` (what ``fedpt run``,
``--resume``, ``experiment`` and the ``flwr run .`` ServerApp do), killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedpt.cli import main
from fedpt.config import SYSTEMS, load_config
from fedpt.errors import FedPTError
from fedpt.runlock import LOCK_NAME, run_lock

from .conftest import FAST

HOLD = ("import sys, time; from pathlib import Path; from fedpt.runlock import run_lock\n"
        "with run_lock(Path(sys.argv[1])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of a run directory; it is killed at the end in any case."""
    procs: list[subprocess.Popen] = []

    def start(out: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"  # blocks until the child has the lock
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path, holder, capsys):
    out = tmp_path / "run"
    cfg = load_config(preset="tiny")
    cfg.run.systems = list(SYSTEMS)
    out.mkdir()
    cfg.save(out / "config.toml")  # looks like a run: --overwrite, --resume and experiment all accept it
    (out / "rounds.jsonl").write_text("written by the holder\n")
    proc = holder(out)
    refused = f"error: {out} is in use by another fedpt process (PID {proc.pid}); wait for it to finish or stop it"
    for argv in (["run", "--preset", "tiny", "--out", str(out), "--overwrite", "--no-progress", *FAST],
                 ["run", "--resume", str(out), "--no-progress"],
                 ["experiment", "--preset", "tiny", "--out", str(out), "--no-progress"]):
        assert main(argv) == 2, argv
        assert _error_line(capsys).startswith(refused), argv
    assert (out / "rounds.jsonl").read_text() == "written by the holder\n"  # nothing was replaced


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    with pytest.raises(FedPTError, match=f"PID {proc.pid}"):
        with run_lock(out):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (out / LOCK_NAME).read_text().strip() == str(proc.pid)  # the file stays: a PID file would be stale
    with run_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with run_lock(out):  # the same process may nest (experiment -> run)
            pass
        # ... and another process is refused while this one holds it.
        other = subprocess.run([sys.executable, "-c", HOLD, str(out)], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert other.returncode != 0 and f"PID {os.getpid()}" in other.stderr
    second = holder(out)  # released at the end of the block: a new process takes it
    assert (out / LOCK_NAME).read_text().strip() == str(second.pid)
