"""Fault injection, to prove the run survives what real federations do to it.

Two kinds, both off unless asked for:

- **Device faults** (config ``[faults]``): a Flower client mod makes a seeded fraction of the
  device rounds crash (raise), hang past the round timeout, or die (process exit). It wraps
  the ClientApp, so it works the same in the simulation and on real SuperNodes, and the
  server's handling (``federation.round_timeout``, ``federation.min_results``, failures logged
  per round) is exercised exactly as a real outage would exercise it.
- **Server kill points** (environment ``FEDPT_KILL_AT=<point>@<round>``): the server process
  sends itself SIGKILL at a named point of a round, as an OOM killer or a pulled plug would.
  Resume tests use it to stop a run where a timer could not aim: inside distillation, between
  writing a checkpoint and publishing it. ``FEDPT_FAIL_AT`` raises an error there instead.
- **Pause points** (``FEDPT_PAUSE_AT=<point>@<round>`` with ``FEDPT_PAUSE_FILE=<path>``): the
  process reaching the point (the server, or for ``device-training`` the device) writes the
  file and waits there until it is stopped. Signal tests wait for the file, then send SIGTERM:
  the signal lands at a named point, whatever the machine's speed, with no timer to race.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable

from flwr.app import Context, Message

from fedpt.errors import FedPTError

KILL_POINTS = ("device-training", "distillation", "evaluation", "checkpoint-write", "checkpoint-publish")
DEVICE_FAULTS = ("crash", "hang", "exit")


class InjectedFault(RuntimeError):
    """Raised by an injected fault, so logs and tests can tell it from a real one."""


def kill_point(point: str, server_round: int) -> None:
    """SIGKILL (``FEDPT_KILL_AT``), raise (``FEDPT_FAIL_AT``) or pause (``FEDPT_PAUSE_AT``) here
    when the environment says so."""
    here = f"{point}@{server_round}"
    pause_point(point, server_round)
    if os.environ.get("FEDPT_KILL_AT") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FEDPT_FAIL_AT") == here:
        raise InjectedFault(f"injected server failure at {here}")


def pause_point(point: str, server_round: int) -> None:
    """``FEDPT_PAUSE_AT=<point>@<round>``: announce arrival in ``FEDPT_PAUSE_FILE`` and wait to be stopped."""
    if os.environ.get("FEDPT_PAUSE_AT") != f"{point}@{server_round}":
        return
    marker = os.environ.get("FEDPT_PAUSE_FILE")
    if marker:
        with open(marker, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {point}@{server_round}\n")
    while True:  # until a signal ends the process
        time.sleep(0.5)


def device_fault(seed: int, crash: float, hang: float, exit_: float, server_round: int,
                 partition_id: int) -> str | None:
    """Which fault (if any) this device suffers this round: seeded, so a rerun fails the same way."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{partition_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    for name, rate in (("crash", crash), ("hang", hang), ("exit", exit_)):
        if u < rate:
            return name
        u -= rate
    return None


def inject_device_faults(msg: Message, context: Context,
                         call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: apply the run's ``[faults]`` to this device before it trains."""
    from fedpt.federation.records import message_config

    found = message_config(msg)
    if found is None:
        return call_next(msg, context)
    cfg, config = found
    faults = cfg.faults
    if not (faults.crash or faults.hang or faults.exit):
        return call_next(msg, context)
    partition_id = int(context.node_config.get("partition-id", 0))
    server_round = int(config["server-round"])
    fault = device_fault(faults.seed, faults.crash, faults.hang, faults.exit, server_round, partition_id)
    if fault == "crash":
        raise InjectedFault(f"injected crash (device {partition_id}, round {server_round})")
    if fault == "exit":
        os._exit(17)  # the process dies without a word, as on a power loss
    reply = call_next(msg, context)
    if fault == "hang":  # replies, but after the server stopped waiting
        _hang(faults.hang_seconds)
    return reply


def _hang(seconds: float) -> None:
    """Sleep ``seconds``, or until the file ``FEDPT_RELEASE_HANGS`` names exists (tests release a
    hung device when the server has stopped waiting for it: an event, not a race with a timer)."""
    release = os.environ.get("FEDPT_RELEASE_HANGS")
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (release and os.path.exists(release)):
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


def check_kill_point_env() -> None:
    """A typo in FEDPT_KILL_AT/FEDPT_FAIL_AT would silently never fire: refuse it."""
    for var in ("FEDPT_KILL_AT", "FEDPT_FAIL_AT", "FEDPT_PAUSE_AT"):
        value = os.environ.get(var)
        if not value:
            continue
        point, _, rnd = value.partition("@")
        if point not in KILL_POINTS or not rnd.isdigit():
            raise FedPTError(f"{var}={value!r}: expected <point>@<round> with point one of {', '.join(KILL_POINTS)}")
