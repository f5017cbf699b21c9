"""Simulated devices share the machine's cores: a device still training takes an idle one's.

``fedpt run`` trains ``cores / federation.client_cpus`` devices at once, one torch thread each
(Ray's actors). A round ends when its slowest device process does, and devices are uneven (their
rows differ in length): in the default job on 2 cores, one process went on alone on one thread
for the last 92 s of round 1 and 60 s of round 2 while the other core sat idle. Here each device process
holds a lock file while it tunes (``busy``), and between decoder layers (forward and, under
activation checkpointing, the backward's recompute) sets its torch threads to
``cores // busy processes`` (``ThreadGovernor``). It gives threads back at once when a sibling
starts; it takes more only after the count stayed lower for ``settle_seconds`` (a sibling between
two devices of a round) and the machine's cores were that idle over that time (other work on a
shared machine, or the test suite's other worker, is not ours to crowd out).

Only ``fedpt run``'s simulation sets it up (``FEDPT_CORE_SHARE`` for its Ray workers); a device
on its own machine (a SuperNode) uses the threads it was given. ``federation.share_idle_cores``
turns it off. With fp32 on MKL (MKL_CBWR strict, which ``fedpt`` sets) a device step's loss and
gradients are bit-identical on one or two threads (measured on the AVX2 EPYC); other kernels
(oneDNN bf16) promise no such thing, so on bf16 CPUs the last bits of a run can depend on timing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "FEDPT_CORE_SHARE"  # "<cores>:<folder>", set by fedpt run's simulation for its device processes


@dataclass(frozen=True)
class CoreShare:
    """The device processes of one machine: a folder of lock files, and the cores they share."""

    folder: Path
    cores: int

    def encode(self) -> str:
        return f"{self.cores}:{self.folder}"

    @classmethod
    def from_environment(cls) -> CoreShare | None:
        value = os.environ.get(ENV, "")
        cores, _, folder = value.partition(":")
        if not folder or not cores.isdigit() or not Path(folder).is_dir():
            return None
        return cls(Path(folder), max(1, int(cores)))

    def busy_processes(self) -> int:
        """How many processes hold their lock now (this one included, if it does).

        A process that died holding one does not count: the kernel drops a flock with its holder.
        """
        count = 0
        for path in self.folder.glob("*.busy"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # its holder finished while we listed the folder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                count += 1
            finally:
                os.close(fd)  # also drops the shared lock, if we got it
        return count

    def threads(self) -> int:
        return max(1, self.cores // max(1, self.busy_processes()))

    @contextmanager
    def busy(self) -> Iterator[None]:
        """This process counts as busy (one lock file per process, removed when done)."""
        path = self.folder / f"{os.getpid()}.busy"  # the pid never leaves this machine's temp folder
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only for a sibling's instant look (busy_processes)
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)


def remove_stale_folders(parent: Path) -> None:
    """Remove share folders (``fedpt-cores-<pid>-*``) of servers that died without their exit hooks
    (SIGKILL): their pid is gone. A reused pid only leaves a folder behind."""
    for folder in parent.glob("fedpt-cores-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def idle_core_seconds() -> float | None:
    """Seconds the machine's cores have been idle since boot, summed (``/proc/stat``); None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()  # "cpu user nice system idle iowait ..." in clock ticks
    except OSError:
        return None
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """A forward pre-hook: sets torch's threads from the share, at most every ``check_seconds``."""

    def __init__(self, share: CoreShare, check_seconds: float = 0.25, settle_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 idle: Callable[[], float | None] = idle_core_seconds) -> None:
        self.share, self.check_seconds, self.settle_seconds, self.clock = share, check_seconds, settle_seconds, clock
        self.idle = idle
        self._checked = float("-inf")
        self._more_since: float | None = None  # when the share first offered more threads than we use
        self._idle_since: float | None = None  # the machine's idle core-seconds then
        self.changes: list[int] = []  # thread counts set, in order (for the device's metrics)

    def __call__(self, *_: Any) -> None:
        import torch

        now = self.clock()
        if now - self._checked < self.check_seconds:
            return
        self._checked = now
        want, have = self.share.threads(), torch.get_num_threads()
        if want > have:
            if self._more_since is None:
                self._more_since, self._idle_since = now, self.idle()
            if now - self._more_since < self.settle_seconds:
                return
            idle_now = self.idle()
            if idle_now is not None and self._idle_since is not None and now > self._more_since:
                idle_cores = (idle_now - self._idle_since) / (now - self._more_since)
                if idle_cores < 0.75 * (want - have):  # the cores are busy with something else: look again
                    self._more_since, self._idle_since = now, idle_now
                    return
        self._more_since = None
        if want != have:
            torch.set_num_threads(want)
            self.changes.append(want)


@contextmanager
def governed_threads(model: Any, share: CoreShare | None, **governor_args: Any) -> Iterator[ThreadGovernor | None]:
    """While inside, ``model``'s decoder layers adjust this process's threads to the share.

    The hooks sit on each layer's children (attention, MLP, norms): a checkpointed layer's
    recompute in the backward calls those again, so the count is also rechecked there. The
    thread count in force before is restored on the way out.
    """
    if share is None:
        yield None
        return
    import torch

    from fedpt.train import checkpointed_layers

    governor = ThreadGovernor(share, **governor_args)
    before = torch.get_num_threads()
    handles = [child.register_forward_pre_hook(governor) for layer in checkpointed_layers(model)
               for child in layer.children()]
    try:
        yield governor
    finally:
        for handle in handles:
            handle.remove()
        torch.set_num_threads(before)


@contextmanager
def device_busy(enabled: bool) -> Iterator[CoreShare | None]:
    """The machine's share (None outside ``fedpt run``'s simulation or when off), held busy while inside."""
    share = CoreShare.from_environment() if enabled else None
    if share is None:
        yield None
        return
    with share.busy():
        yield share
