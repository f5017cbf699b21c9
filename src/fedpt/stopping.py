"""A clean stop on SIGTERM / SIGINT for the long commands (``fedpt run``, ``experiment``, ``serve``).

``kill``, systemd, Docker and Slurm send SIGTERM; a terminal sends SIGINT. Either must end the
command and everything it started (Ray's GCS, raylet and workers, a llama.cpp or uvicorn
thread) within seconds, leave no half-written file, and say how to go on.

Why a hard exit rather than unwinding: the FedPT server step runs in Flower's ServerApp
thread, which no signal reaches, and Ray's driver cannot be shut down from a signal handler
(``ray.shutdown()`` there aborts the process). Every file a run keeps is written atomically
(temp file + rename: checkpoints, predictions, adapters) or tolerated torn (the last line of
``rounds.jsonl``), so stopping at any instruction loses at most the round in progress, which
``--resume`` redoes.

Why the handlers are installed *after* Ray starts: ``ray.init`` replaces the process's SIGTERM
handler with its own (``sys.exit``, which Flower's simulation loop swallows: the run went on)
and its C++ core installs a failure handler that logs a stack dump. So ``fedpt run`` starts
Ray itself (``fedpt.federation.simulation``) and calls ``install`` right after.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

GRACE_SECONDS = 3.0  # children get SIGTERM, then SIGKILL after this
_state: dict[str, object] = {"message": None}
_lock = threading.Lock()


def install(message: Callable[[], str] | str | None = None, keep_message: bool = False) -> None:
    """From the main thread: SIGTERM and SIGINT stop this process and all its descendants.

    ``message`` (or a callable giving it) is printed with the last line, e.g. how to resume.
    Installing again re-takes the signals from whoever took them since (``keep_message``: with
    the message given before).
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals reach the main thread only; an embedding program keeps its own handling
    if not keep_message:
        _state["message"] = message
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, _frame: object) -> None:
    if not _lock.acquire(blocking=False):
        return  # a second signal while stopping: the first one finishes the job
    name = signal.Signals(signum).name
    message = _state["message"]
    try:
        text = message() if callable(message) else message
    except Exception:
        text = None
    line = f"\nstopped by {name}" + (f"; {text}" if text else "") + "\n"
    stderr = None
    try:  # what the dying threads and processes still print would bury the line: silence them
        sys.stdout.flush()
        sys.stderr.flush()
        stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    except Exception:  # a closed stream must not keep the process alive
        pass
    stop_descendants()
    try:
        os.write(stderr if stderr is not None else 2, line.encode())
    except Exception:
        pass
    os._exit(128 + signum)


def stop_descendants(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every process this one started (recursively), SIGKILL what is left after ``grace``."""
    import psutil

    for _ in range(3):  # a dying parent (Ray's raylet) may have started a child meanwhile: look again
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        if not children:
            return
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace)
