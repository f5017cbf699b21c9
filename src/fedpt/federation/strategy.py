"""``FedPTStrategy``: Flower's FedAvg with FedPT's server steps. One round, five steps:

1. **broadcast** the small LM's adapter to the sampled devices -> ``configure_train``
2. **local tuning** on each device -> ``fedpt.train.local_tune`` (via ``device.tune_on_device``)
3. **aggregation**, FedAvg weighted by examples -> ``aggregate_train`` -> ``FedAvg.aggregate_train``
4. **proxy-tuning** of the black-box large LM -> ``ServerModels.proxy_tune`` (``fedpt.proxy``)
5. **distillation** of the proxy-tuned large LM into the small LM -> ``ServerModels.distill``
   (``fedpt.distill``); its result is the adapter that round ``t + 1`` broadcasts.

Baselines are the same strategy with switches from ``fedpt.systems``: ``fedavg-small`` and
``fedavg-pt`` skip step 5 (``fedavg-pt`` still evaluates the proxy-tuned large LM),
``fedavg-large`` tunes the large LM's own adapter on the devices. Systems whose device rounds
are identical (``fedavg-small`` and ``fedavg-pt``) share one strategy: trained once, recorded,
evaluated and checkpointed once per system (``shared``).
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from logging import WARNING
from pathlib import Path
from typing import Any

import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, Strategy

from fedpt import profile
from fedpt.errors import FedPTError, ServiceError
from fedpt.faults import kill_point
from fedpt.federation.local_dp import LocalDp
from fedpt.federation.records import (ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, PARTITION_KEY, UNIFORM_WEIGHT_KEY,
                                     arrays_to_state, state_to_arrays)
from fedpt.metrics import RoundLog, RoundRecord
from fedpt.models.logits import LogitSource
from fedpt.predictions import model_name, prediction_path, write_predictions
from fedpt.progress import Progress
from fedpt.server import ServerModels
from fedpt.systems import SystemSpec


class TargetReached(Exception):
    """Every system of the strategy met ``federation.target_rouge_l``: no more rounds.

    Flower's ``Strategy.start`` has no early stop; this ends it after the round's record and
    checkpoint are written. ``arrays`` is the adapter of that round.
    """

    def __init__(self, server_round: int, arrays: ArrayRecord) -> None:
        super().__init__(f"target Rouge-L reached at round {server_round}")
        self.server_round, self.arrays = server_round, arrays


class FedPTStrategy(FedAvg):
    """FedAvg over LoRA adapters whose ``aggregate_train`` also proxy-tunes and distills.

    Parameters
    ----------
    server : ServerModels
        The server's tokenizer, small LM (+adapter) and black-box large LM.
    spec : SystemSpec
        Which system this is (FedPT or a baseline).
    round_log : RoundLog
        Where each round's record goes (``rounds.jsonl``).
    num_rounds : int
        Total rounds (the last one is always evaluated).
    eval_every : int
        Evaluate at round 0, every ``eval_every`` rounds, and at the last round.
    progress : Progress, optional
        Told when a phase starts and a round ends (live display).
    first_round : int
        Rounds already completed (resuming from a checkpoint): Flower counts rounds from 1
        again, this strategy reports and seeds them as ``first_round + n``.
    on_round_end : callable, optional
        ``(system, round, arrays, state)`` after each round's record of ``system`` is written
        (checkpointing); ``state`` is ``strategy_state()``.
    aggregator : Strategy, optional
        Samples the devices and averages the valid updates: Flower's FedMedian, FedTrimmedAvg,
        Krum, or its central-DP wrapper around FedAvg (which must see the broadcast to clip
        against and account each round); default: this FedAvg itself.
    max_update_norm : float
        Reject updates farther than this (L2) from the broadcast adapter; 0 disables the check.
    min_results : int
        Fewer valid updates than this fail the round.
    local_dp : LocalDp, optional
        Devices noise their own updates (``privacy.dp = "local"``); the round records report
        the epsilon spent.
    sampling_seed : int
        Seeds the choice of devices when a round samples a subset: the same seed and round pick
        the same partitions in every run (a resumed one included), whatever the node ids.
    shared : tuple of SystemSpec
        Further systems whose device rounds are this one's (same device model, no distillation
        difference): each gets its own records, predictions and checkpoints from these rounds.
    active : set of str, optional
        Which of ``spec`` and ``shared`` still record rounds (default all; resuming, a system
        that already finished is left out).
    run_dir : Path, optional
        Where every evaluation's predictions go (``<run_dir>/<system>/predictions/``).
    target_rouge_l : float
        Stop a system with a proxy-tuned large LM once that LM's Rouge-L on the held-out set
        reaches this (0 = run every round); the strategy ends when all its systems stopped.
    **fedavg_kwargs
        Passed to ``FedAvg`` (sampling fractions, minimum nodes).

    ``record`` is the current round's ``RoundRecord`` (written to ``rounds.jsonl`` by ``evaluate``).
    """

    def __init__(self, server: ServerModels, spec: SystemSpec, round_log: RoundLog, num_rounds: int,
                 eval_every: int = 1, progress: Progress | None = None, first_round: int = 0,
                 on_round_end: Callable[[int, ArrayRecord, dict[str, Any]], None] | None = None,
                 aggregator: Strategy | None = None, max_update_norm: float = 0.0, min_results: int = 1,
                 sampling_seed: int = 0, local_dp: LocalDp | None = None, shared: tuple[SystemSpec, ...] = (),
                 active: set[str] | None = None, run_dir: Path | None = None, target_rouge_l: float = 0.0,
                 **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.server = server
        self.spec = spec
        self.round_log = round_log
        self.num_rounds = num_rounds
        self.eval_every = eval_every
        self.progress = progress
        self.first_round = first_round
        self.on_round_end = on_round_end
        self.aggregator = aggregator
        self.max_update_norm = max_update_norm
        self.min_results = min_results
        self._broadcast: dict[str, Any] = {}
        self._sent: list[int] = []  # node ids this round's messages went to
        self._norms: list[float] = []
        self.sampling_seed = sampling_seed
        self.local_dp = local_dp
        self._partitions: dict[int, int] = {}  # node id -> partition id, asked once per node
        self.record = RoundRecord(round=0, system=spec.name)
        self._round_start = time.perf_counter()
        for other in shared:
            if (other.device_model, other.distill) != (spec.device_model, spec.distill):
                raise ValueError(f"{other.name} cannot share {spec.name}'s device rounds: they train differently")
        self.members = {s.name: s for s in (spec, *shared)}
        self.active = set(self.members) if active is None else set(active)
        self.run_dir = run_dir
        self.target_rouge_l = target_rouge_l
        self._member_records: dict[str, RoundRecord] = {}

    # -- step 1: broadcast ------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.first_round
        sampler = self.aggregator if self.aggregator is not None else super()
        if self.fraction_train < 1.0:  # a subset: make the draw a function of (seed, round, partition)
            grid = PartitionOrderedGrid(grid, self._partitions)
        with _seeded_random(f"{self.sampling_seed}/{server_round}"):
            messages = list(sampler.configure_train(server_round, arrays, config, grid))
        self._broadcast = arrays_to_state(arrays)  # what valid replies must match in keys, shapes, dtypes
        self.begin_round(server_round, [m.metadata.dst_node_id for m in messages], arrays.count_bytes())
        self.phase(server_round, f"device training ({len(messages)} devices)")
        self._sent_at = time.perf_counter()
        profile.waiting("device rounds (wait)")
        if kill_point_armed := _timer_kill("device-training", server_round):
            kill_point_armed.start()  # fires once the messages are out and devices are training
        return messages

    # -- steps 3, 4, 5 ----------------------------------------------------------------------

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.first_round
        replies = list(replies)
        if getattr(self, "_sent_at", None) is not None:  # broadcast to the last reply (or the timeout)
            profile.add("device rounds (wait)", time.perf_counter() - self._sent_at, rounds=1)
            self._sent_at = None
            profile.waiting(None)
        record = self.record
        ok, problems = [], []
        self._norms = []  # L2 norms of the valid updates (to choose a DP clip or a norm bound)
        for message in replies:
            reason = _error_reason(message) or self.check_update(message)
            if reason:
                problems.append(f"node {message.metadata.src_node_id}: {reason}")
            else:
                ok.append(message)
        replied = {m.metadata.src_node_id for m in replies}
        problems += [f"node {node}: no reply within the round timeout" for node in self._sent if node not in replied]
        if self._norms:
            record.update_norm_max = max(self._norms)
            record.update_norm_median = sorted(self._norms)[len(self._norms) // 2]
        self.record_outcome(server_round, len(ok), problems)
        # Replies arrive in completion order; a fixed order makes the float sums reproducible.
        ok.sort(key=lambda m: (int(m.content[METRICS_KEY][NUM_EXAMPLES_KEY]),
                               float(m.content[METRICS_KEY]["train_loss"])))
        aggregate = self.aggregator.aggregate_train if self.aggregator is not None else super().aggregate_train
        if self.accountant is not None and len(ok) < len(self._sent):
            raise FedPTError(f"round {server_round}: central DP needs the updates of all {len(self._sent)} sampled "
                             f"devices (its noise is calibrated to them), {len(ok)} valid ({'; '.join(problems)[:300]})")
        if self.accountant is not None:
            # DP-FedAvg weighs devices equally: the mean's sensitivity is then clip / n.
            for message in ok:
                message.content[METRICS_KEY][UNIFORM_WEIGHT_KEY] = 1
        with self.server_step(server_round, "aggregation"), profile.phase("aggregation"):
            arrays, metrics = aggregate(server_round, ok)  # step 3: FedAvg (or a robust / DP variant)
        if arrays is None:
            raise FedPTError(f"round {server_round}: the aggregator returned no model "
                             f"({len(ok)} of {len(self._sent)} sampled devices' updates were valid)")
        if self.accountant is not None:
            spent = self.accountant.get_privacy_spent()
            record.dp_epsilon, record.dp_delta = spent.epsilon, spent.delta
        elif self.local_dp is not None:
            record.dp_epsilon, record.dp_delta = self.local_dp.spent(server_round)
        record.train_loss = float(metrics["train_loss"]) if metrics is not None else None
        self.record_devices([m.content[METRICS_KEY] for m in ok], [m.content[ARRAYS_KEY].count_bytes() for m in ok])
        trained = sorted((m.metadata.src_node_id, int(m.content[METRICS_KEY].get(PARTITION_KEY, -1)),
                          _device_seconds(m.content[METRICS_KEY])) for m in ok)
        record.nodes, record.partitions = [n for n, _, _ in trained], [p for _, p, _ in trained]
        record.device_seconds = [s for _, _, s in trained]
        return self.after_aggregation(server_round, arrays), metrics

    def record_outcome(self, server_round: int, accepted: int, problems: list[str],
                       counted: str = "valid update(s)") -> None:
        """Log every device left out and why, count them in the round's record; too few accepted fail the round."""
        for problem in problems:
            log(WARNING, "round %s: update not aggregated: %s", server_round, problem)
        self.record.clients, self.record.failures, self.record.problems = accepted, len(problems), problems
        if accepted < self.min_results:
            raise FedPTError(f"round {server_round}: {accepted} {counted}, {self.min_results} needed "
                             f"({'; '.join(problems)[:300] or 'no replies'})")

    def record_devices(self, device_metrics: list[Any], upload_bytes: list[int]) -> None:
        """The aggregated devices' costs: mean train time and tokens, peak memory, bytes uploaded."""
        record, n = self.record, len(device_metrics)
        record.bytes_up, record.bytes_up_per_device = sum(upload_bytes), max(upload_bytes)
        record.device_train_seconds = sum(float(d["train_seconds"]) for d in device_metrics) / n
        record.device_train_tokens = sum(float(d["train_tokens"]) for d in device_metrics) / n
        if all("prepare_seconds" in d and "device_process" in d for d in device_metrics):  # older devices lack them
            record.device_prepare_seconds = sum(float(d["prepare_seconds"]) for d in device_metrics) / n
            busy: dict[int, float] = {}  # device process -> seconds
            for d in device_metrics:
                process = int(d["device_process"])
                busy[process] = busy.get(process, 0.0) + _device_seconds(d)
            record.device_busiest_seconds, record.device_processes = max(busy.values()), len(busy)
        if all("train_threads_max" in d for d in device_metrics):
            record.device_threads_max = max(int(d["train_threads_max"]) for d in device_metrics)
        if all("train_layers_kept" in d for d in device_metrics):
            record.device_layers_kept = sum(float(d["train_layers_kept"]) for d in device_metrics) / n
        record.device_peak_memory_bytes = max(int(d.get("peak_rss_bytes", 0)) for d in device_metrics)

    def after_aggregation(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Steps 4-5 for FedPT (baselines skip them): the adapter the next round broadcasts."""
        if not self.spec.distill:
            return arrays
        with self.server_step(server_round, "proxy-tuning + distillation"):
            return self.proxy_tune_and_distill(server_round, arrays)

    def check_update(self, message: Message) -> str | None:
        """Why a device's update must not be averaged (None when it is fine).

        Wrong keys, shapes or dtypes, NaN/Inf, or an L2 distance to the broadcast adapter above
        ``max_update_norm``: a buggy or poisoned device must not reach the global model.
        """
        try:
            state = arrays_to_state(message.content[ARRAYS_KEY])
            int(message.content[METRICS_KEY][NUM_EXAMPLES_KEY])
        except (KeyError, TypeError, ValueError) as err:
            return f"malformed reply ({err})"
        if state.keys() != self._broadcast.keys():
            return f"adapter keys differ from the broadcast ({len(state)} vs {len(self._broadcast)} tensors)"
        distance = 0.0
        for key, value in state.items():
            expected = self._broadcast[key]
            if value.shape != expected.shape or value.dtype != expected.dtype:
                return f"{key} is {value.dtype}{tuple(value.shape)}, expected {expected.dtype}{tuple(expected.shape)}"
            if not torch.isfinite(value).all():
                return f"{key} holds NaN or Inf"
            distance += float((value.double() - expected.double()).pow(2).sum())
        if self.max_update_norm and distance**0.5 > self.max_update_norm:
            return f"update norm {distance**0.5:.3g} exceeds federation.max_update_norm={self.max_update_norm}"
        self._norms.append(distance**0.5)
        return None

    def proxy_tune_and_distill(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Steps 4 and 5: the averaged small adapter steers the large LM, which then teaches it."""
        self.phase(server_round, "proxy-tuning + distillation")
        aggregated = arrays_to_state(arrays)
        self.server.load_adapter("small", aggregated)
        if self.run_dir is not None:  # the expert step 4 steers with, before step 5 moves it (aggregated_adapter_path)
            from safetensors.torch import save_file

            path = aggregated_adapter_path(self.run_dir, self.spec.name, server_round)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in aggregated.items()}, str(path))
        # builds the proxy-tuned teacher (step 4) itself
        result = self.server.distill(server_round, after_step=lambda step: kill_point("distillation", server_round))
        self.record.kd_loss, self.record.distill_seconds = result.loss, result.seconds
        self.record.kd_kl_before, self.record.kd_kl_after = result.kl_before, result.kl_after
        return state_to_arrays(self.server.adapter_state("small"))

    # -- server-side evaluation (Flower calls it at round 0 and after every round) -------------

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and self.first_round > 0:
            return None  # resuming: round 0 was evaluated and recorded by the first run
        server_round += self.first_round
        record = self.record if server_round > 0 else RoundRecord(round=0, system=self.spec.name)
        # One record per system recording these rounds; costs and losses are the shared training's.
        self._member_records = {
            name: record if name == record.system else replace(record, system=name, rougeL_sets={},
                                                                problems=list(record.problems))
            for name in self.members if name in self.active}
        due = server_round == 0 or server_round % self.eval_every == 0 or server_round == self.num_rounds
        if due:
            self.phase(server_round, "evaluation")
            start = time.perf_counter()
            with self.server_step(server_round, "evaluation"):
                self._evaluate_into(record, server_round, arrays)
            record.eval_seconds = time.perf_counter() - start
        record.seconds = time.perf_counter() - self._round_start if server_round > 0 else record.eval_seconds or 0.0
        for member in self._member_records.values():
            member.eval_seconds, member.seconds = record.eval_seconds, record.seconds
            self.round_log.write(member)
            if self.progress is not None:
                self.progress.round_done(member)
            if server_round > 0 and self.on_round_end is not None:
                self.on_round_end(member.system, server_round, arrays, self.strategy_state())
        if server_round > 0 and self.target_rouge_l > 0:
            reached = {name for name, member in self._member_records.items()
                       if member.rougeL_proxy is not None and member.rougeL_proxy >= self.target_rouge_l}
            self.active -= reached
            if not self.active:
                raise TargetReached(server_round, arrays)
        shown = self._member_records.get(record.system) or next(iter(self._member_records.values()), record)
        scores = {k: v for k, v in (("rougeL_small", shown.rougeL_small), ("rougeL_proxy", shown.rougeL_proxy),
                                    ("rougeL_large", shown.rougeL_large)) if v is not None}
        return MetricRecord(scores) if scores else None

    def _evaluate_into(self, record: RoundRecord, server_round: int, arrays: ArrayRecord) -> None:
        """Score every model the recording systems report; each system's predictions go to its folder."""
        server, spec = self.server, self.spec
        server.load_adapter(spec.device_model, arrays_to_state(arrays))
        members = list(self._member_records.values()) or [record]

        def score(role: str, source: LogitSource, into: list[RoundRecord], field: str) -> None:
            # At round 0 every adapter is the identity (LoRA B = 0): these are the pretrained
            # models, scored once and shared by all systems of the run.
            results = server.evaluate(source, identity=role if server_round == 0 else server.identity(role),
                                      progress=self.progress, label=role)
            for member in into:
                for set_name, result in results.items():
                    member.rougeL_sets.setdefault(set_name, {})[role] = result.rouge_l
                    if self.run_dir is not None:
                        write_predictions(prediction_path(self.run_dir, member.system, server_round, set_name,
                                                          model_name(role, server_round)), result)
                setattr(member, field, next(iter(results.values())).rouge_l)

        if spec.device_model == "large":
            score("large", server.tuned_source("large"), members, "rougeL_large")
            return
        score("small", server.tuned_source("small"), members, "rougeL_small")
        kill_point("evaluation", server_round)
        proxied = [m for m in members if self.members[m.system].proxy]
        if proxied:
            # Round 0: tuned == base exactly, so the proxy IS the large model; skip 2 of 3 forwards.
            if server_round:
                score("proxy", server.proxy_tune(), proxied, "rougeL_proxy")
            else:
                score("large", server.large_logits(), proxied, "rougeL_proxy")

    def begin_round(self, server_round: int, sent_to: list[int], bytes_per_device: int) -> RoundRecord:
        """Start round ``server_round``'s record: which nodes were asked, what each was sent."""
        self._round_start = time.perf_counter()
        self.record = RoundRecord(round=server_round, system=self.spec.name,
                                  bytes_down_per_device=bytes_per_device, bytes_down=bytes_per_device * len(sent_to))
        self._sent = list(sent_to)
        return self.record

    # -- state that must survive a restart ------------------------------------------------

    @property
    def accountant(self) -> Any:
        """The DP aggregator's privacy accountant (None without DP)."""
        return getattr(self.aggregator, "accountant", None)

    def strategy_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the adapter: the privacy spent so far.

        Nothing else carries over between rounds: device and distillation optimizers are fresh
        every round, and every random draw is seeded from (run seed, round, device).
        """
        return {"accountant": self.accountant.state_dict()} if self.accountant is not None else {}

    def load_strategy_state(self, state: dict[str, Any]) -> None:
        if self.accountant is not None and "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])

    @contextmanager
    def server_step(self, server_round: int, step: str) -> Iterator[None]:
        """A failing server step fails the round with its reason; the last checkpoint stays valid."""
        try:
            yield
        except ServiceError as err:  # an outage, not bad input: the round fails and can be resumed
            raise FedPTError(f"round {server_round}: {step} failed: {err}") from err
        except FedPTError:
            raise
        except Exception as err:  # any library error: one line with the step and the cause
            raise FedPTError(f"round {server_round}: {step} failed: {type(err).__name__}: "
                             f"{str(err).splitlines()[0][:300] if str(err) else ''}") from err

    def phase(self, server_round: int, phase: str) -> None:
        if self.progress is not None:
            self.progress.phase(self.spec.name, server_round, phase)


def aggregated_adapter_path(run_dir: Path, system: str, server_round: int) -> Path:
    """FedPT's FedAvg'd small adapter of a round before distillation (peft state-dict keys, fp32).

    Its difference from the base is what the devices learned; the distilled adapter's also carries
    what the large LM taught it. Proxy-tuning with either is a choice the alpha sweep compares.
    """
    return run_dir / system / "aggregated" / f"round-{server_round}.safetensors"


@contextmanager
def _seeded_random(seed: str) -> Iterator[None]:
    """Flower samples nodes with the global ``random``: seed it for one call, then restore it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class PartitionOrderedGrid:
    """A Grid whose ``get_node_ids`` lists nodes by partition id (then node id).

    Node ids are random per run (simulation) or per connection (SuperNodes), so Flower's
    seeded ``random.sample`` over them would pick different data every run. Ordered by the
    partition each node trains on, the same seed picks the same partitions. Each node is asked
    its ``partition-id`` once (a ``query`` message; nodes that do not answer sort last).
    Everything else is the wrapped Grid's.
    """

    def __init__(self, grid: Grid, cache: dict[int, int]) -> None:
        self._grid, self._cache = grid, cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        unknown = [n for n in nodes if n not in self._cache]
        if unknown:
            asks = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
            for reply in self._grid.send_and_receive(asks, timeout=60.0):
                if not reply.has_error() and METRICS_KEY in reply.content:
                    self._cache[reply.metadata.src_node_id] = int(reply.content[METRICS_KEY][PARTITION_KEY])
        return sorted(nodes, key=lambda n: (self._cache.get(n, 2**62), n))


def _timer_kill(point: str, server_round: int) -> threading.Timer | None:
    """``FEDPT_KILL_AT=device-training@N``: SIGKILL shortly after round N's messages go out."""
    if os.environ.get("FEDPT_KILL_AT") != f"{point}@{server_round}":
        return None
    timer = threading.Timer(0.3, kill_point, args=(point, server_round))
    timer.daemon = True
    return timer


def _device_seconds(metrics: Any) -> float:
    """A device's set-up and training seconds (training alone from devices that do not report set-up)."""
    return float(metrics.get("prepare_seconds", 0.0)) + float(metrics["train_seconds"])


def _error_reason(message: Message) -> str | None:
    """A device that crashed or timed out comes back as an error reply: name its exception.

    Flower wraps the device's traceback in the reason; its first ``SomeError: text`` line is
    the root cause (e.g. ``InjectedFault: injected crash (device 3, round 2)``).
    """
    if not message.has_error():
        return None
    lines = [line.strip() for line in message.error.reason.splitlines() if line.strip()]
    causes = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if causes:
        cause = causes[0]  # chained tracebacks print the root cause first
    else:  # "<class 'ray.exceptions.ActorDiedError'>:<'The actor died ...'>"
        wrapped = _WRAPPED.match(lines[0]) if lines else None
        cause = f"{wrapped[1].rsplit('.', 1)[-1]}: {wrapped[2]}" if wrapped else (lines[0] if lines else "unknown")
    if "ActorDiedError" in cause or "RayActorError" in cause:  # the device's process is gone, not an exception
        # Ray's memory monitor says so; a kernel OOM kill (SIGKILL) looks like any other death
        oom = "running low on memory" in message.error.reason or "OutOfMemoryError" in message.error.reason
        why = "out of memory" if oom else "its process died"
        return f"error: {why} (Ray: {_short(cause)})"[:240]
    return f"error: {cause.rsplit('.', 1)[-1] if ': ' not in cause else _short(cause)}"[:240]


def _short(cause: str) -> str:
    """``fedpt.faults.InjectedFault: text`` -> ``InjectedFault: text``."""
    name, _, text = cause.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}: {text}"


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Fault|Exit|Interrupt)\w*: ")
_WRAPPED = re.compile(r"^<class '([\w.()]+)'>:<'(.*?)'?>?$")
