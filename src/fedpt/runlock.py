"""One process per run directory: an exclusive ``flock`` on ``<run dir>/.fedpt.lock``.

Two processes writing one run directory (``fedpt run --out DIR`` still running while
``fedpt run --resume DIR`` starts in a second terminal) would both append to ``rounds.jsonl``
and overwrite each other's checkpoints. The lock is held for the life of ``fedpt run``,
``--resume``, ``fedpt experiment`` and the ``flwr run .`` ServerApp; a second one is refused
with one line naming the holder's PID (written into the lock file).

A lock from a killed process is never stale in the way a PID file is: the kernel releases an
``flock`` when the last descriptor of its holder closes, on any death (SIGKILL included), so
the next run simply takes it and writes its own PID. The lock file itself stays in the run
directory (``--overwrite`` keeps it) so that two processes always lock the same inode.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpt.errors import FedPTError

LOCK_NAME = ".fedpt.lock"

# Locks this process holds (resolved run dir -> depth): `fedpt experiment` holds the lock and
# calls the same run preparation as `fedpt run`, which must not refuse its own process (a second
# flock on a new descriptor of the same file would).
_held: dict[str, int] = {}


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block (creates the directory)."""
    key = str(out_dir.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(out_dir)
        os.close(fd)
        raise FedPTError(f"{out_dir} is in use by another fedpt process (PID {holder or 'unknown'}); wait for it "
                         "to finish or stop it, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def lock_holder(out_dir: Path) -> int | None:
    """The PID written by the last process that took the lock (None when there is none)."""
    try:
        return int((out_dir / LOCK_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
