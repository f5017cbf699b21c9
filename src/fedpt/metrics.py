"""Structured per-round records (JSONL) and cost accounting. Knows no algorithm."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    """One line of ``rounds.jsonl``: one system, one round (round 0 = before any training)."""

    round: int
    system: str
    train_loss: float | None = None  # example-weighted mean of the devices' SFT loss
    kd_loss: float | None = None  # mean distillation loss over the server's KD steps
    kd_kl_before: float | None = None  # forward KL teacher->student on the KD pool, before ...
    kd_kl_after: float | None = None  # ... and after the KD steps
    rougeL_small: float | None = None  # the (tuned) small LM
    rougeL_proxy: float | None = None  # the proxy-tuned large LM
    rougeL_large: float | None = None  # the large LM tuned directly (fedavg-large)
    # The three above are on the first evaluation set (held out from the training source);
    # this has every set: {set name: {"small" | "proxy" | "large": Rouge-L}}.
    rougeL_sets: dict[str, dict[str, float]] = field(default_factory=dict)
    clients: int = 0  # replies aggregated
    failures: int = 0  # replies not aggregated: device errors/timeouts and rejected updates
    problems: list[str] = field(default_factory=list)  # why, per device
    nodes: list[int] = field(default_factory=list)  # Flower node ids of the aggregated devices (sorted)
    partitions: list[int] = field(default_factory=list)  # their partition-id (node config), same order
    update_norm_median: float | None = None  # L2 distance of valid updates to the broadcast adapter ...
    update_norm_max: float | None = None  # ... (before any DP clipping): guides privacy.clipping_norm
    bytes_down: int = 0  # server -> devices, all devices
    bytes_up: int = 0  # devices -> server, all devices
    bytes_down_per_device: int = 0
    bytes_up_per_device: int = 0
    device_train_seconds: float | None = None  # mean per device
    device_train_tokens: float | None = None  # mean per device (FLOPs estimate: 6 * params * tokens)
    device_prepare_seconds: float | None = None  # mean per device: data and model set-up before training
    # The longest one device process was busy (set-up + training of the devices it ran) this round:
    # with processes running side by side, the least the server can wait for them.
    device_busiest_seconds: float | None = None
    device_processes: int | None = None  # distinct device processes that trained this round
    # The most torch threads a device trained on: above a process's own when it took the cores of
    # siblings done with their round (fedpt.federation.core_share).
    device_threads_max: int | None = None
    # Decoder layers that kept their activations per device step, mean over devices and steps
    # (train.activation_memory_mb; 0: every layer recomputed in the backward pass).
    device_layers_kept: float | None = None
    device_seconds: list[float] = field(default_factory=list)  # each device's set-up + training, as ``partitions``
    device_peak_memory_bytes: int | None = None  # max over devices of the device process's peak RSS
    dp_epsilon: float | None = None  # central DP: privacy spent so far (RDP accountant) ...
    dp_delta: float | None = None  # ... at this delta
    distill_seconds: float | None = None
    eval_seconds: float | None = None
    seconds: float = 0.0  # wall time of the whole round

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class RoundLog:
    """Appends records to ``rounds.jsonl`` as they complete (a crash keeps finished rounds).

    An existing file is read back, so a resumed run extends it.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: list[RoundRecord] = []
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    self.records.append(RoundRecord(**json.loads(line)))
                except (ValueError, TypeError):
                    pass  # a line torn by a crash mid-write; its round is redone on resume

    def restore(self, system: str, last_round: int, saved: list[dict] | None = None) -> None:
        """Make ``system``'s records those of its last checkpoint (round ``last_round``).

        ``saved`` (from the checkpoint) replaces them; without it, records after
        ``last_round`` (written after the checkpoint) are dropped.
        """
        others = [r for r in self.records if r.system != system]
        if saved is not None:
            mine = [RoundRecord(**row) for row in saved]
        elif last_round == 0:
            mine = []  # no checkpoint: the system starts over, round 0 included
        else:
            mine = [r for r in self.records if r.system == system and r.round <= last_round]
        self.records = others + mine
        if self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(r.to_json() + "\n" for r in self.records))
            os.replace(tmp, self.path)

    def write(self, record: RoundRecord) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(record.to_json() + "\n")


# Reading PSS walks every page table of every process: ~0.3 s of kernel time per read of the
# default job's 12 processes on a 2-core EPYC, so reading it every second took a third of a core
# from a compute-bound job. PSS is read when the RSS sum (cheap: /proc/PID/statm) passes its
# highest at a read, with reads taking at most this share of one core ...
PSS_DUTY_AT_NEW_HIGHS = 0.25
PSS_DUTY_OTHERWISE = 0.02  # ... and otherwise at most this share (each process's own peak)


class PeakMemory:
    """Peak memory of this process and all its children (Ray actors included), sampled.

    Sums PSS (proportional set size), so pages shared between processes (mmapped weights,
    Ray's object store, libraries) count once, not once per process as RSS would. Besides the
    peak of the sum it keeps what made it (``at_peak``: each process's share and the server's
    phase at that moment, ``fedpt.profile.current``) and each process's own peak
    (``per_process``): the numbers that say which process to slim and when.

    Every ``interval`` the RSS of each process is read (cheap); PSS, which costs a page-table
    walk of every process, only when ``due``: a new high of the RSS sum, within a CPU budget.
    A PSS peak away from the RSS sum's highs can be missed by up to ``PSS_DUTY_OTHERWISE``'s
    spacing (~15 s on the default job).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.at_peak: dict[str, object] = {}
        self.per_process: dict[int, dict[str, Any]] = {}  # pid -> {"role", "peak_bytes"}
        self.pss_reads = 0
        self._last_read: float | None = None  # when PSS was last read (monotonic seconds)
        self._read_cost = 0.0  # CPU seconds that read took
        self._rss_read_high = 0  # the highest RSS sum at a PSS read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.tick(me, [me, *me.children(recursive=True)], time.monotonic())
            self._stop.wait(self.interval)

    def tick(self, me: Any, procs: list[Any], now: float) -> bool:
        """One sampling tick at ``now``: the RSS sum, then PSS (``sample``) if ``due``. True if read."""
        import psutil

        rss = 0
        for proc in procs:
            try:
                rss += proc.memory_info().rss
            except (psutil.Error, AttributeError):
                continue
        if not self.due(rss, now):
            return False
        started = time.thread_time()  # this thread's CPU time, the kernel's page-table walks included
        self.sample(me, procs)
        self._read_cost, self._last_read = time.thread_time() - started, now
        self._rss_read_high = max(self._rss_read_high, rss)
        self.pss_reads += 1
        return True

    def due(self, rss_sum: int, now: float) -> bool:
        """Whether to read PSS now: the first time; at a new high of the RSS sum, if the last read
        was ``PSS_DUTY_AT_NEW_HIGHS``'s spacing ago; otherwise after ``PSS_DUTY_OTHERWISE``'s."""
        if self._last_read is None:
            return True
        duty = PSS_DUTY_AT_NEW_HIGHS if rss_sum > self._rss_read_high else PSS_DUTY_OTHERWISE
        return now - self._last_read >= self._read_cost / duty

    def sample(self, me: Any, procs: list[Any]) -> None:
        """One sample of ``procs`` (``me`` is the server); public so tests can feed it."""
        import psutil

        from fedpt import profile

        shares: dict[str, int] = {}
        for proc in procs:
            try:
                pss = proc.memory_full_info().pss
                label = "server" if proc.pid == me.pid else f"{process_role(proc.cmdline())} (pid {proc.pid})"
            except (psutil.Error, AttributeError):
                continue
            seen = self.per_process.setdefault(proc.pid, {"role": label, "peak_bytes": 0})
            if "device actor" not in seen["role"]:  # a Ray worker that ran a device stays one
                seen["role"] = label
            seen["peak_bytes"] = max(seen["peak_bytes"], pss)
            shares[seen["role"]] = pss
        total = sum(shares.values())
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.at_peak = {"phase": profile.current(), "processes": dict(sorted(shares.items(), key=lambda kv: -kv[1]))}

    def report(self) -> dict[str, object]:
        """For ``profile.json``: the peak, what made it, and every process's own peak."""
        own = sorted(self.per_process.values(), key=lambda seen: -seen["peak_bytes"])
        return {"peak_bytes": self.peak_bytes, "at_peak": self.at_peak,
                "per_process_peak_bytes": {seen["role"]: seen["peak_bytes"] for seen in own},
                "pss_reads": self.pss_reads}

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def process_role(cmdline: list[str]) -> str:
    """A child process's role from its command line: a Flower device (a Ray actor running the
    ClientApp), another Ray worker, Ray's own services, or the program's name."""
    text = " ".join(cmdline)
    if "ClientAppActor" in text:
        return "device actor"
    if text.startswith("ray::"):
        return text.split()[0]
    for service in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env"):
        if service in text:
            return f"ray {service.removesuffix('.py')}"
    return Path(cmdline[0]).name if cmdline else "?"
