"""SecAgg+ (Flower's legacy workflow + ``secaggplus_mod``) with FedPT.

The real protocol runs here -- key agreement, Shamir shares, masking, quantization, unmasking --
through an in-process Grid that copies every message through Flower's protobuf serde, as the
SuperLink does. No Ray: fast and deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedpt.errors import FedPTError
from fedpt.federation import secagg
from fedpt.federation.client_app import app as client_app
from fedpt.federation.driver import run_systems
from fedpt.federation.records import state_to_arrays
from fedpt.federation.strategy import FedPTStrategy
from fedpt.metrics import RoundLog
from fedpt.systems import SYSTEM_SPECS

from .conftest import FAST


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; outside a run, give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


class LocalGrid(Grid):
    """Every node is ``app`` with its own Context (partition id i); replies come back in order.

    An exception in the app becomes an error reply, as in Flower's runtimes.
    """

    def __init__(self, app, num_nodes: int) -> None:
        self.app = app
        self._run = Run.create_empty(run_id=1)
        self.contexts = {7000 + i: Context(run_id=1, node_id=7000 + i, state=RecordDict(), run_config={},
                                           node_config={"partition-id": i, "num-partitions": num_nodes})
                         for i in range(num_nodes)}
        self.uploads: list[RecordDict] = []  # everything the server received

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message = _wire(message)
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - a crashed device
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            reply = _wire(reply)
            if reply.has_content():
                self.uploads.append(reply.content)
            replies.append(reply)
        return replies


KEYS = ["layer.0.lora_A.weight", "layer.0.lora_B.weight", "layer.1.lora_A.weight", "layer.1.lora_B.weight"]


def _broadcast(rng) -> dict[str, torch.Tensor]:
    shapes = {"lora_A": (8, 32), "lora_B": (32, 8)}
    scale = {"lora_A": 0.18, "lora_B": 0.01}  # A ~ U(+-1/sqrt(fan_in)); B small after a few rounds
    return {k: torch.from_numpy(rng.uniform(-1, 1, shapes[kind]).astype(np.float32) * scale[kind])
            for k in KEYS for kind in [k.split(".")[2]]}


def _config(**overrides):
    from fedpt.config import load_config

    sets = [FAST[i + 1] for i in range(0, len(FAST), 2)]
    return load_config(preset="tiny", overrides=[*sets, *[f"{k}={v}" for k, v in overrides.items()]])


def _fake_devices(monkeypatch, broadcast, sizes, bound, crash=()):
    """``tune_on_device`` replaced: device i returns broadcast + an Adam-sized random update."""
    rng = np.random.default_rng(1)
    updates = [{k: torch.from_numpy(rng.uniform(-bound, bound, v.shape).astype(np.float32))
                for k, v in broadcast.items()} for _ in sizes]
    tuned = [{k: broadcast[k] + u[k] for k in broadcast} for u in updates]

    def fake_tune(cfg_json, system, server_round, adapter, context):
        i = int(context.node_config["partition-id"])
        assert all(torch.equal(adapter[k], broadcast[k]) for k in broadcast)  # keys and order survive Parameters
        if i in crash:
            raise RuntimeError(f"device {i} ran out of memory")
        metrics = {"num-examples": sizes[i], "train_loss": 1.0 + i, "train_last_loss": 1.0, "train_tokens": 100,
                   "train_seconds": 0.1, "peak_rss_bytes": 1000}
        return {k: v.clone() for k, v in tuned[i].items()}, metrics

    monkeypatch.setattr(secagg, "tune_on_device", fake_tune)
    return tuned


def _plain_fedavg(broadcast, tuned, sizes):
    """Flower's message-API FedAvg (what FedPTStrategy aggregates with) of the same replies."""
    from flwr.serverapp.strategy import FedAvg

    replies = [Message(RecordDict({"arrays": state_to_arrays(t), "metrics": MetricRecord({
        "num-examples": n, "train_loss": 1.0, "train_seconds": 0.1, "train_tokens": 100})}),
        dst_node_id=0, message_type="train") for t, n in zip(tuned, sizes)]
    arrays, _ = FedAvg().aggregate_train(1, replies)
    return arrays.to_torch_state_dict()


def _secagg_round(cfg, broadcast, num_nodes, system="fedavg-small", **settings):
    """One SecAgg+ round of ``system`` on a LocalGrid; evaluation is stubbed (no server models)."""
    fedpt = FedPTStrategy(server=None, spec=SYSTEM_SPECS[system], round_log=RoundLog(None), num_rounds=1)
    fedpt._evaluate_into = lambda record, server_round, arrays: None
    grid = LocalGrid(client_app, num_nodes)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    settings = secagg.secagg_settings(cfg, **settings)
    final = secagg.run_secagg_system(grid, context, fedpt, cfg, system, broadcast, settings, num_rounds=1)
    return final, fedpt, grid, settings


def test_secagg_mean_equals_fedavg_up_to_quantization(monkeypatch):
    cfg = _config()
    broadcast = _broadcast(np.random.default_rng(0))
    sizes = [13, 40, 7]
    clip = secagg.default_clipping_range(cfg.train)  # steps * lr * 7.3 = 2 * 2e-3 * 7.3
    tuned = _fake_devices(monkeypatch, broadcast, sizes, bound=cfg.train.steps * cfg.train.lr)  # 1 lr per step
    final, fedpt, grid, settings = _secagg_round(cfg, broadcast, 3, max_weight=64.0)
    expected = _plain_fedavg(broadcast, tuned, sizes)

    assert list(final) == KEYS and settings.clipping_range == pytest.approx(clip)
    assert settings.quantization_range == 2**30  # 3 * 2^30 < 2^32
    error = max(float((final[k].double() - expected[k].double()).abs().max()) for k in KEYS)
    # Quantization: < 3 steps of 2c/Q, scaled by max_weight / total examples (~2e-10 here); both sides
    # also round to float32 (entries ~0.2: half an ulp ~ 7e-9 each).
    tolerance = settings.error_bound(3, sum(sizes)) + 2 * np.finfo(np.float32).eps * 0.2
    print(f"SecAgg+ vs FedAvg: max abs error {error:.3g}, tolerance {tolerance:.3g}")
    assert error <= tolerance
    assert float((final[KEYS[1]] - broadcast[KEYS[1]]).abs().max()) > 1e-3  # the round did move the adapter
    record = fedpt.record
    assert (record.clients, record.failures, record.problems) == (3, 0, [])
    assert record.train_loss == pytest.approx((13 * 1 + 40 * 2 + 7 * 3) / 60)
    # The server never received a device's update: only masked int64 vectors.
    masked = [u for u in grid.uploads if "fitres.parameters" in u.array_records]
    assert len(masked) == 3 and all(len(u["fitres.parameters"]) == 0 for u in masked)


def test_flowers_default_quantization_is_coarser(monkeypatch):
    """Flower's 2^22 grid, clip 8 and max_weight 1000: visible error on updates of this size."""
    cfg = _config()
    broadcast = _broadcast(np.random.default_rng(0))
    sizes = [13, 40, 7]
    tuned = _fake_devices(monkeypatch, broadcast, sizes, bound=cfg.train.steps * cfg.train.lr)
    final, *_ = _secagg_round(cfg, broadcast, 3, max_weight=1000.0, clipping_range=8.0,
                              quantization_range=2**22)
    expected = _plain_fedavg(broadcast, tuned, sizes)
    error = max(float((final[k].double() - expected[k].double()).abs().max()) for k in KEYS)
    print(f"Flower defaults: max abs error {error:.3g}")
    assert 1e-6 < error < 3 * 2 * 8.0 / 2**22 * 1000 / 60


def test_a_device_crash_is_recovered_by_the_protocol(monkeypatch):
    """One device crashes while training ([faults], as in the plain path): its masks are rebuilt
    from its neighbours' shares and the mean is FedAvg of the three others."""
    from fedpt.faults import device_fault

    seed = next(s for s in range(100) if [device_fault(s, 0.25, 0, 0, 1, i) for i in range(4)].count("crash") == 1)
    crashed = [device_fault(seed, 0.25, 0, 0, 1, i) for i in range(4)].index("crash")
    cfg = _config(**{"federation.num_clients": 4, "federation.clients_per_round": 4, "faults.crash": 0.25,
                     "faults.seed": seed})
    broadcast = _broadcast(np.random.default_rng(0))
    sizes = [13, 40, 7, 22]
    tuned = _fake_devices(monkeypatch, broadcast, sizes, bound=cfg.train.steps * cfg.train.lr)
    final, fedpt, _, settings = _secagg_round(cfg, broadcast, 4, max_weight=64.0)
    survivors = [i for i in range(4) if i != crashed]
    expected = _plain_fedavg(broadcast, [tuned[i] for i in survivors], [sizes[i] for i in survivors])
    error = max(float((final[k].double() - expected[k].double()).abs().max()) for k in KEYS)
    assert error <= settings.error_bound(3, sum(sizes[i] for i in survivors)) + 2 * np.finfo(np.float32).eps * 0.2
    record = fedpt.record
    assert (record.clients, record.failures) == (3, 1)
    assert record.problems == [f"node {7000 + crashed}: error: InjectedFault: injected crash "
                               f"(device {crashed}, round 1)"]


def test_bad_updates_are_withheld_by_their_devices(monkeypatch):
    """NaN and over-norm updates: the server cannot reject them, so their devices do not submit them."""
    cfg = _config(**{"federation.num_clients": 5, "federation.clients_per_round": 5,
                     "federation.max_update_norm": 1.0})
    broadcast = _broadcast(np.random.default_rng(0))
    sizes = [13, 40, 7, 22, 9]
    tuned = _fake_devices(monkeypatch, broadcast, sizes, bound=cfg.train.steps * cfg.train.lr)
    tuned[1][KEYS[0]][0, 0] = float("nan")
    for key in KEYS:
        tuned[3][key] += 0.5  # norm 16 > 1
    final, fedpt, _, settings = _secagg_round(cfg, broadcast, 5, max_weight=64.0)
    good = [0, 2, 4]
    expected = _plain_fedavg(broadcast, [tuned[i] for i in good], [sizes[i] for i in good])
    error = max(float((final[k].double() - expected[k].double()).abs().max()) for k in KEYS)
    assert error <= settings.error_bound(3, sum(sizes[i] for i in good)) + 2 * np.finfo(np.float32).eps * 0.2
    assert (fedpt.record.clients, fedpt.record.failures) == (3, 2)
    reasons = " | ".join(fedpt.record.problems)
    assert "node 7001: error: FedPTError: this device's update holds NaN or Inf" in reasons
    assert "node 7003: error: FedPTError: update norm 16 exceeds federation.max_update_norm=1.0" in reasons


def test_too_many_crashes_halt_the_round_loudly(monkeypatch):
    cfg = _config()
    broadcast = _broadcast(np.random.default_rng(0))
    _fake_devices(monkeypatch, broadcast, [5, 5, 5], bound=1e-3, crash=(0, 1))
    halted = (r"round 1: secure aggregation halted at its collect masked vectors stage \(1 device\(s\) left, "
              r"each needs 2 live neighbours\): node 7000: error: RuntimeError: device 0 ran out")
    with pytest.raises(FedPTError, match=halted):
        _secagg_round(cfg, broadcast, 3, max_weight=64.0)


def test_incompatible_settings_are_refused():
    for overrides, match in (({"federation.aggregation": "'median'"}, "only sees their sum"),
                             ({"privacy.dp": "'central'"}, "secure aggregation hides"),
                             ({"federation.clients_per_round": 1}, "at least 2 devices")):
        with pytest.raises(FedPTError, match=match):
            _config(**{"federation.secure_aggregation": "true", **overrides})


def _e2e_config():
    return _config(**{"federation.rounds": 1, "run.systems": "['fedpt']", "federation.secure_aggregation": "true"})


def test_one_fedpt_round_end_to_end(monkeypatch, fedpt_home, one_thread):
    """Tiny models: 3 devices really tune, SecAgg+ averages, the server proxy-tunes, distills, evaluates.

    Then the same round through the plain message-API path (``run_systems``, same in-process Grid):
    the records must agree -- the devices train identically and the adapters differ by ~1e-10.
    """
    cfg = _e2e_config()
    seen: dict[str, object] = {}
    real_aggregate = secagg.SecAggFedPT.aggregate_fit
    real_tune = secagg.tune_on_device
    tuned: list[tuple[dict, int]] = []

    def spy_tune(*args):  # the test, not the server, keeps each device's result to check the mean
        state, metrics = real_tune(*args)
        tuned.append(({k: v.clone() for k, v in state.items()}, metrics["num-examples"]))
        return state, metrics

    def spy_aggregate(self, server_round, results, failures):
        out = real_aggregate(self, server_round, results, failures)
        seen.update(broadcast=dict(self._broadcast), mean=self.last_mean_update, settings=self.settings)
        return out

    monkeypatch.setattr(secagg, "tune_on_device", spy_tune)
    monkeypatch.setattr(secagg.SecAggFedPT, "aggregate_fit", spy_aggregate)
    records = run_systems(LocalGrid(client_app, 3), cfg, out_dir=None)

    assert [(r.system, r.round) for r in records] == [("fedpt", 0), ("fedpt", 1)]
    last = records[-1]
    assert last.clients == 3 and last.failures == 0 and last.problems == [] and last.train_loss > 0
    assert last.kd_kl_before is not None and last.rougeL_small is not None and last.rougeL_proxy is not None
    # SecAgg+'s mean (before distillation) against FedAvg of what the devices really produced.
    sizes = [n for _, n in tuned]
    broadcast, settings = seen["broadcast"], seen["settings"]
    fedavg = {k: sum(s[k].double() * n for s, n in tuned) / sum(sizes) for k in broadcast}
    error = max(float(np.abs(broadcast[k].double().numpy() + u - fedavg[k].numpy()).max())
                for k, u in zip(broadcast, seen["mean"]))
    largest = max(float(np.abs(u).max()) for u in seen["mean"])
    print(f"e2e: max |mean update| {largest:.3g}, clip {settings.clipping_range:.3g}, error {error:.3g}")
    assert 0 < largest < settings.clipping_range
    assert error <= settings.error_bound(3, sum(sizes)) + 1e-12

    cfg.federation.secure_aggregation = False
    plain = run_systems(LocalGrid(client_app, 3), cfg, None)
    assert [(r.system, r.round) for r in plain] == [("fedpt", 0), ("fedpt", 1)]
    assert plain[1].train_loss == pytest.approx(last.train_loss, rel=1e-12)  # same broadcast, same seeds
    assert plain[1].kd_kl_before == pytest.approx(last.kd_kl_before, rel=1e-4)
    assert plain[1].kd_kl_after == pytest.approx(last.kd_kl_after, rel=1e-3)
    assert plain[1].rougeL_sets == last.rougeL_sets  # greedy decoding does not see a 1e-10 difference


@pytest.mark.slow
def test_secagg_in_flowers_simulation_runtime(fedpt_home, one_thread):
    """Ray actors as devices: the mod's state survives the four stages; same records as in-process."""
    cfg = _e2e_config()
    cfg.run.threads = 1
    from fedpt.federation.simulation import simulate

    records = simulate(cfg, out_dir=None)
    local = run_systems(LocalGrid(client_app, 3), cfg, out_dir=None)
    assert [(r.round, r.clients, r.failures) for r in records] == [(0, 0, 0), (1, 3, 0)]
    # Seeded training and seeded stochastic rounding: bit-identical to the in-process run.
    for a, b in zip(records, local):
        assert (a.train_loss, a.kd_loss, a.rougeL_sets) == (b.train_loss, b.kd_loss, b.rougeL_sets)


def test_resume_after_a_server_failure_matches_an_uninterrupted_run(tmp_path, monkeypatch, fedpt_home, one_thread):
    """Checkpoints work as in the plain path; seeded rounding makes the resumed run bit-identical."""
    cfg = _config(**{"federation.rounds": 2, "run.systems": "['fedavg-small']", "federation.secure_aggregation": "true"})
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setenv("FEDPT_FAIL_AT", "evaluation@2")
    with pytest.raises(FedPTError, match="round 2: evaluation failed: InjectedFault"):
        run_systems(LocalGrid(client_app, 3), cfg, out)
    monkeypatch.delenv("FEDPT_FAIL_AT")
    resumed = run_systems(LocalGrid(client_app, 3), cfg, out)
    (tmp_path / "clean").mkdir()
    clean = run_systems(LocalGrid(client_app, 3), cfg, tmp_path / "clean")
    assert [(r.round, r.clients, r.train_loss, r.rougeL_sets) for r in resumed] == \
        [(r.round, r.clients, r.train_loss, r.rougeL_sets) for r in clean]
    assert (out / "fedavg-small" / "adapter" / "adapter_model.safetensors").is_file()
