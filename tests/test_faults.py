"""Device faults injected into the Flower simulation runtime, what a device sends, central DP end to end."""

import json
import os
import time

import numpy as np
import pytest
import torch

from fedpt.cli import main
from fedpt.faults import device_fault

from .conftest import FAST


def test_device_faults_are_seeded_and_follow_their_rates():
    draws = [device_fault(7, 0.2, 0.1, 0.05, rnd, dev) for rnd in range(1, 101) for dev in range(20)]
    assert draws == [device_fault(7, 0.2, 0.1, 0.05, rnd, dev) for rnd in range(1, 101) for dev in range(20)]
    for name, rate in (("crash", 0.2), ("hang", 0.1), ("exit", 0.05)):
        assert abs(draws.count(name) / len(draws) - rate) < 0.02, name
    assert device_fault(7, 0.0, 0.0, 0.0, 1, 0) is None


# Faults seed 218 (found by search): no fault in round 1, and in round 2 devices 3 and 7 crash and
# device 2 hangs: 30% of the federation fails that round.
FAULT_SEED, HANGS = 218, {1: 0, 2: 1}
ROUND_TIMEOUT = HANG_SECONDS = 600  # never reached: the test's clock and release decide (below)


class _GridClock:
    """``time`` for Flower's in-memory grid: the round's wait times out the moment every device that
    does not hang has replied, and never before. The verdict cannot depend on the machine's speed."""

    def __init__(self) -> None:
        self.expired = False

    def time(self) -> float:
        return time.time() + (10 * ROUND_TIMEOUT if self.expired else 0.0)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.mark.slow
def test_a_round_with_30_percent_of_devices_failing_completes(tmp_path, monkeypatch):
    """10 devices, 2 rounds; in round 2 two devices crash and one hangs. The server's wait ends on
    its round timeout (here: a clock that expires as soon as the 9 devices that do not hang have
    replied), and the hung device is released only after that (FEDPT_RELEASE_HANGS): it replies
    after the server stopped waiting, by construction, however loaded or fast the machine is."""
    import flwr.superlink.grid.inmemory_grid as inmemory

    out, release = tmp_path / "faulty", tmp_path / "release-hangs"
    faults = {rnd: {dev: device_fault(FAULT_SEED, 0.2, 0.1, 0.0, rnd, dev) for dev in range(10)} for rnd in (1, 2)}
    assert set(faults[1].values()) == {None}
    assert {dev: f for dev, f in faults[2].items() if f} == {2: "hang", 3: "crash", 7: "crash"}
    assert HANGS == {rnd: list(f.values()).count("hang") for rnd, f in faults.items()}

    clock, waiting = _GridClock(), {}
    pull, send_and_receive = inmemory.InMemoryGrid.pull_messages, inmemory.InMemoryGrid.send_and_receive

    def counted_pull(self, message_ids):
        replies = list(pull(self, message_ids))
        waiting["replies"] += len(replies)
        clock.expired = waiting["replies"] >= waiting["expected"]
        return replies

    def round_trip(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        server_round = int(train[0].content["config"]["server-round"]) if train else 0
        waiting.update(replies=0, expected=len(messages) - HANGS.get(server_round, 0))
        clock.expired = False
        try:
            return send_and_receive(self, messages, timeout=timeout)
        finally:
            if HANGS.get(server_round):
                release.touch()  # the server stopped waiting: the hung device may reply now

    monkeypatch.setattr(inmemory, "time", clock)
    monkeypatch.setattr(inmemory.InMemoryGrid, "pull_messages", counted_pull)
    monkeypatch.setattr(inmemory.InMemoryGrid, "send_and_receive", round_trip)
    monkeypatch.setenv("FEDPT_RELEASE_HANGS", str(release))
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST,
                 "--set", "run.systems=['fedpt']", "--set", "federation.num_clients=10",
                 "--set", "federation.clients_per_round=10", "--set", "federation.min_results=5",
                 "--set", f"federation.round_timeout={ROUND_TIMEOUT}", "--set", f"faults.seed={FAULT_SEED}",
                 "--set", "faults.crash=0.2", "--set", "faults.hang=0.1",
                 "--set", f"faults.hang_seconds={HANG_SECONDS}"]) == 0
    rows = {r["round"]: r for r in map(json.loads, (out / "rounds.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0, 1, 2]
    assert (rows[1]["clients"], rows[1]["failures"], rows[1]["problems"]) == (10, 0, [])
    row = rows[2]
    reported = sorted(p.split("error: ", 1)[1] for p in row["problems"] if "error: " in p)
    assert reported == [f"InjectedFault: injected crash (device {dev}, round 2)" for dev in (3, 7)]  # who and why
    assert sum("no reply within the round timeout" in p for p in row["problems"]) == 1  # the hung device
    assert (row["clients"], row["failures"]) == (7, 3)
    assert sorted(row["partitions"]) == [0, 1, 4, 5, 6, 8, 9]
    assert row["train_loss"] > 0 and row["rougeL_proxy"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"]["fedpt"]["final"]["round"] == 2


def actor_pool_fetch():
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    return BasicActorPool.fetch_result_and_return_actor_to_pool


# Faults seed 2 (found by search): in round 1 device 2's process exits (os._exit, as a power loss
# or the OOM killer ends it); round 2 has no fault.
EXIT_SEED = 2


@pytest.mark.slow
def test_a_dead_device_process_is_replaced_and_its_loss_is_recorded(tmp_path, capsys):
    """Flower's Ray pool kept a dead actor and routed later devices to it: every later round
    silently trained fewer devices. Now the lost device round is recorded with its reason (in
    the round, the summary and the table) and the next round trains all four devices again."""
    from fedpt.federation.actor_pool import replace_dead_actors

    assert [device_fault(EXIT_SEED, 0, 0, 0.25, 1, dev) for dev in range(4)] == [None, None, "exit", None]
    assert [device_fault(EXIT_SEED, 0, 0, 0.25, 2, dev) for dev in range(4)] == [None] * 4
    out = tmp_path / "exit"
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST,
                 "--set", "run.systems=['fedpt']", "--set", "federation.num_clients=4",
                 "--set", "federation.clients_per_round=4", "--set", "federation.min_results=1",
                 "--set", f"faults.seed={EXIT_SEED}", "--set", "faults.exit=0.25"]) == 0
    rows = {r["round"]: r for r in map(json.loads, (out / "rounds.jsonl").read_text().splitlines())}
    assert (rows[1]["clients"], rows[1]["failures"]) == (3, 1)
    assert len(rows[1]["problems"]) == 1 and "error: its process died (Ray: ActorDiedError" in rows[1]["problems"][0]
    assert sorted(rows[1]["partitions"]) == [0, 1, 3]  # the device whose process exited is the one missing
    assert (rows[2]["clients"], rows[2]["failures"], rows[2]["problems"]) == (4, 0, [])  # not silently fewer
    devices = json.loads((out / "summary.json").read_text())["systems"]["fedpt"]["device_rounds"]
    assert (devices["trained"], devices["lost"]) == (7, 1) and devices["why"][0].startswith("round 1: node ")
    assert "fedpt: 1 of 8 device rounds lost (first: round 1: node " in capsys.readouterr().out
    patched = actor_pool_fetch()
    replace_dead_actors()  # idempotent: patched once per process
    assert actor_pool_fetch() is patched


def test_a_device_sends_only_its_adapter_and_counts(tiny_cfg, fedpt_home):
    """The reply of a real ClientApp call: one ArrayRecord with exactly the adapter tensors
    it received (same names and shapes), numeric metrics from a fixed list, nothing else."""
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpt.federation.client_app import app
    from fedpt.federation.device import device_model
    from fedpt.federation.records import train_config
    from fedpt.models.lora import get_adapter_state

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cfg = tiny_cfg
    cfg.train.steps = 1
    model, _ = device_model(cfg.model.small, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                            tuple(cfg.lora.targets))
    adapter = get_adapter_state(model)
    config = train_config(cfg, "fedpt")
    config["server-round"] = 1
    msg = Message(content=RecordDict({"arrays": ArrayRecord(adapter), "config": config}), dst_node_id=0,
                  message_type="train")
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                      run_config={})
    reply = app(msg, context)
    assert not reply.has_error()
    content = reply.content
    assert set(content.array_records) == {"arrays"} and not content.config_records
    assert set(content.metric_records) == {"metrics"}
    sent = content["arrays"].to_torch_state_dict()
    assert sent.keys() == adapter.keys() and all("lora_" in k for k in sent)
    assert all(sent[k].shape == adapter[k].shape for k in sent)
    metrics = dict(content["metrics"])
    assert set(metrics) == {"num-examples", "train_loss", "train_last_loss", "train_tokens", "train_seconds",
                            "prepare_seconds", "device_process", "train_threads_max", "train_layers_kept",
                            "peak_rss_bytes", "partition-id"}
    assert metrics["train_threads_max"] == torch.get_num_threads()  # no core share outside fedpt run's simulation
    # which process trained: a random number per process, the same for its next reply, no pid or host
    assert metrics["device_process"] == app(msg, context).content["metrics"]["device_process"] != os.getpid()
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in metrics.values())
    # The bytes on the wire are the adapter's (plus its name and an npy header per tensor): no data rides along.
    tensor_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    assert tensor_bytes < content["arrays"].count_bytes() <= tensor_bytes + 256 * len(adapter)


@pytest.mark.slow
def test_central_dp_run_reports_epsilon_per_round_and_in_the_summary(tmp_path, capsys):
    out = tmp_path / "dp"
    assert main(["run", "--preset", "tiny", "--no-progress", "--out", str(out), *FAST,
                 "--set", "run.systems=['fedpt']", "--set", "privacy.dp='central'",
                 "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.clipping_norm=0.1"]) == 0
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"] for r in rows]
    assert eps[0] is None and 0 < eps[1] < eps[2]  # privacy loss composes over rounds
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == {"fedpt": eps[2]} and summary["privacy"]["delta"] == {"fedpt": 1e-5}
    assert f"epsilon fedpt {eps[2]:.2f} at delta 1e-05" in capsys.readouterr().out
