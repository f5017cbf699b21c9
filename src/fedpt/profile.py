"""Where a run's seconds go: the server process's phases, timed with the work they did.

``with phase("evaluation: proxy"):`` times a block; code inside it reports its work with
``count(decode_steps=..., new_tokens=...)``, which lands in the innermost open phase. A phase
opened inside another is its own line, and its seconds are taken out of the outer one, so the
lines add up to the time spent in phases. ``fedpt run`` writes the totals to
``<run>/profile.json``; ``fedpt bench --parts job`` divides each phase's rate by its hardware
bound (bytes read per decoding step over the memory bandwidth; FLOPs over the GEMM bound).

Devices train in other processes: their seconds and tokens come from the round records
(``device_train_seconds`` / ``device_train_tokens``), and the wall time the server waits for
them is the phase ``device rounds (wait)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_totals: dict[str, dict[str, float]] = {}
_open: list[list] = []  # [name, started, seconds spent in nested phases]
_waiting: str | None = None  # what the server waits on outside any phase (``waiting``)


@contextmanager
def phase(name: str) -> Iterator[None]:
    entry = [name, time.perf_counter(), 0.0]
    _open.append(entry)
    try:
        yield
    finally:
        _open.pop()
        elapsed = time.perf_counter() - entry[1]
        if _open:
            _open[-1][2] += elapsed
        add(name, elapsed - entry[2])


def count(**work: float) -> None:
    """Add work counters to the innermost open phase (nothing when no phase is open)."""
    if _open:
        _accumulate(_open[-1][0], work)


def add(name: str, seconds: float, **work: float) -> None:
    """A phase timed by its caller (it spans calls, e.g. broadcast to last reply)."""
    _accumulate(name, {"seconds": seconds, "calls": 1, **work})


def _accumulate(name: str, values: dict[str, float]) -> None:
    totals = _totals.setdefault(name, {"seconds": 0.0, "calls": 0})
    for key, value in values.items():
        totals[key] = totals.get(key, 0) + value


def waiting(name: str | None) -> None:
    """Name what the server waits on until ``waiting(None)`` (a span timed by its caller with
    ``add``, such as the devices' round), for ``current``."""
    global _waiting
    _waiting = name


def current() -> str | None:
    """The innermost open phase, else what the server waits on, else None (read by
    ``fedpt.metrics.PeakMemory``'s sampler thread)."""
    try:
        return _open[-1][0]
    except IndexError:
        return _waiting


def snapshot() -> dict[str, dict[str, float]]:
    return {name: dict(values) for name, values in _totals.items()}


def reset() -> None:
    global _waiting
    _totals.clear()
    _waiting = None


def write(path: Path, wall_seconds: float, extra: dict | None = None) -> dict:
    """``profile.json``: every phase's seconds, calls and work, the run's wall time and what no phase covers."""
    phases = snapshot()
    covered = sum(values["seconds"] for values in phases.values())
    report = {"wall_seconds": wall_seconds, "phases": phases, "outside_phases_seconds": wall_seconds - covered,
              **(extra or {})}
    path.write_text(json.dumps(report, indent=1))
    return report
