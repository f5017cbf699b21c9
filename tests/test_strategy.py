import numpy as np
import torch
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedpt.errors import FedPTError
from fedpt.federation.strategy import FedPTStrategy
from fedpt.metrics import RoundLog
from fedpt.systems import SYSTEM_SPECS


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; outside a run, give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _reply(value: float, n: int, loss: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord([np.full((2, 3), value, dtype=np.float32)]),
        "metrics": MetricRecord({"num-examples": n, "train_loss": loss, "train_seconds": 1.0, "train_tokens": 50,
                                 "peak_rss_bytes": 1000 * n}),
    })
    return Message(content=content, dst_node_id=0, message_type="train")


def _strategy(system: str = "fedavg-small") -> FedPTStrategy:
    # No distillation in this system, so the server models are never touched.
    return FedPTStrategy(server=None, spec=SYSTEM_SPECS[system], round_log=RoundLog(None), num_rounds=1,
                         fraction_evaluate=0.0)


def test_fedavg_weights_adapters_by_examples():
    strategy = _strategy()
    _broadcast(strategy)
    replies = [_reply(1.0, 10, 2.0), _reply(4.0, 30, 1.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    (mean,) = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(mean, np.full((2, 3), (1.0 * 10 + 4.0 * 30) / 40))
    assert metrics["train_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert strategy.record.device_peak_memory_bytes == 30_000 and strategy.record.device_train_tokens == 50
    assert strategy.record.clients == 2 and strategy.record.bytes_up == 2 * replies[0].content["arrays"].count_bytes()
    assert strategy.record.device_threads_max is None  # devices that do not report it
    assert strategy.record.device_layers_kept is None


def test_the_round_records_the_busiest_device_process():
    """Devices that ran in one process add up (set-up and training); the round waits for the busiest."""
    strategy = _strategy()
    _broadcast(strategy)
    replies = [_reply(1.0, 10, 2.0), _reply(2.0, 20, 2.0), _reply(3.0, 30, 2.0)]
    for reply, (process, prepare, train, threads, kept) in zip(
            replies, [(7, 2.0, 5.0, 1, 3.0), (7, 0.5, 4.0, 2, 24.0), (9, 3.0, 6.0, 1, 0.0)]):
        reply.content["metrics"].update({"device_process": process, "prepare_seconds": prepare,
                                         "train_seconds": train, "train_threads_max": threads,
                                         "train_layers_kept": kept})
    strategy.aggregate_train(1, replies)
    record = strategy.record
    assert record.device_threads_max == 2  # one device took an idle sibling's core
    assert record.device_layers_kept == pytest.approx(9.0)  # layers that kept activations, mean over devices
    assert record.device_busiest_seconds == pytest.approx(2.0 + 5.0 + 0.5 + 4.0)  # process 7, not 9's 9.0
    assert record.device_processes == 2
    assert record.device_prepare_seconds == pytest.approx((2.0 + 0.5 + 3.0) / 3)
    assert record.device_train_seconds == pytest.approx(5.0)
    assert sorted(record.device_seconds) == pytest.approx([4.5, 7.0, 9.0])  # each device, set-up included


def test_round_with_no_updates_fails_with_the_reason():
    with pytest.raises(FedPTError, match=r"round 1: 0 valid update\(s\), 1 needed \(no replies\)"):
        _strategy().aggregate_train(1, [])


def _broadcast(strategy, value=0.0):
    strategy._broadcast = {"0": torch.full((2, 3), value)}
    strategy._sent = []


def test_poisoned_and_malformed_updates_are_rejected_with_reasons():
    strategy = _strategy()
    strategy.max_update_norm = 20.0
    _broadcast(strategy)
    nan = _reply(float("nan"), 10, 1.0)
    huge = _reply(100.0, 10, 1.0)  # distance sqrt(6) * 100 = 245 > 20
    wrong_shape = Message(content=RecordDict({
        "arrays": ArrayRecord([np.zeros((3, 3), dtype=np.float32)]),
        "metrics": MetricRecord({"num-examples": 5, "train_loss": 1.0, "train_seconds": 1.0, "train_tokens": 1}),
    }), dst_node_id=0, message_type="train")
    wrong_dtype = Message(content=RecordDict({
        "arrays": ArrayRecord([np.zeros((2, 3), dtype=np.float64)]),
        "metrics": MetricRecord({"num-examples": 5, "train_loss": 1.0, "train_seconds": 1.0, "train_tokens": 1}),
    }), dst_node_id=0, message_type="train")
    honest = [_reply(1.0, 10, 2.0), _reply(2.0, 10, 2.0)]
    arrays, _ = strategy.aggregate_train(1, [nan, *honest, huge, wrong_shape, wrong_dtype])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full((2, 3), 1.5))  # honest mean only
    record = strategy.record
    assert record.clients == 2 and record.failures == 4
    reasons = " | ".join(record.problems)
    for expected in ("NaN or Inf", "exceeds federation.max_update_norm=20.0", "(3, 3), expected",
                     "torch.float64(2, 3), expected torch.float32"):
        assert expected in reasons


def test_robust_aggregators_resist_one_poisoned_device():
    from fedpt.config import load_config
    from fedpt.federation.driver import make_aggregator

    for name in ("median", "trimmed-mean", "krum"):
        cfg = load_config(preset="tiny", overrides=[f"federation.aggregation='{name}'", "federation.trim_beta=0.2",
                                                    "federation.krum_malicious=1"])
        strategy = FedPTStrategy(server=None, spec=SYSTEM_SPECS["fedavg-small"], round_log=RoundLog(None),
                                 num_rounds=1, fraction_evaluate=0.0, aggregator=make_aggregator(cfg))
        _broadcast(strategy)
        replies = [_reply(v, 10, 1.0) for v in (1.0, 1.1, 0.9, 1.05, 50.0)]  # last one poisoned, finite
        arrays, _ = strategy.aggregate_train(1, replies)
        assert np.abs(arrays.to_numpy_ndarrays()[0] - 1.0).max() < 0.2, name


def test_too_few_valid_updates_fail_the_round():
    strategy = _strategy()
    strategy.min_results = 2
    _broadcast(strategy)
    with pytest.raises(FedPTError, match="round 1: 1 valid update"):
        strategy.aggregate_train(1, [_reply(1.0, 10, 1.0), _reply(float("inf"), 10, 1.0)])


class _Grid:
    """Just enough of a Flower Grid for ``configure_train``: three connected nodes."""

    def get_node_ids(self):
        return [11, 12, 13]


def _dp_strategy(noise: float) -> FedPTStrategy:
    from fedpt.config import load_config
    from fedpt.federation.driver import make_aggregator

    cfg = load_config(preset="tiny", overrides=[
        "privacy.dp='central'", f"privacy.noise_multiplier={noise}", "privacy.clipping_norm=0.5",
        "federation.num_clients=3", "federation.clients_per_round=3"])
    sampling = dict(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    return FedPTStrategy(server=None, spec=SYSTEM_SPECS["fedavg-small"], round_log=RoundLog(None),
                         num_rounds=3, aggregator=make_aggregator(cfg, **sampling), **sampling)


def _dp_round(strategy: FedPTStrategy, rnd: int, updates=(10.0, 10.0, 10.0), broadcast: float = 0.0) -> np.ndarray:
    """One round: nodes 11/12/13 reply ``broadcast + update`` (every entry) with 10/20/30 examples."""
    from flwr.app import ConfigRecord

    sent_arrays = ArrayRecord([np.full((2, 3), broadcast, dtype=np.float32)])
    sent = list(strategy.configure_train(rnd, sent_arrays, ConfigRecord({}), _Grid()))
    assert sorted(m.metadata.dst_node_id for m in sent) == [11, 12, 13]
    replies = [_reply(broadcast + update, n, 1.0) for update, n in zip(updates, (10, 20, 30))]
    for reply, node in zip(replies, (11, 12, 13)):
        reply.metadata.__dict__["_src_node_id"] = node
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return arrays.to_numpy_ndarrays()[0]


def test_central_dp_clips_each_update_then_averages_uniformly():
    # Updates 0.01, 0.02 and 10 in each of 6 entries (norms 0.024, 0.049, 24.5): the first two are
    # under the 0.5 clip, the third is scaled to norm 0.5, i.e. 0.5 / sqrt(6) = 0.2041 per entry.
    # Uniform mean: (0.01 + 0.02 + 0.2041) / 3 = 0.07804 per entry; weighting by the 10/20/30
    # examples would give (0.1 + 0.4 + 6.124) / 60 = 0.1104, and no clipping 3.343. The broadcast
    # is 1, so clipping the adapters (norm 2.45 .. 26.9) instead of their updates would show too.
    mean = _dp_round(_dp_strategy(noise=1e-6), 1, updates=(0.01, 0.02, 10.0), broadcast=1.0)
    clipped = 0.5 / np.sqrt(6)
    np.testing.assert_allclose(mean, np.full((2, 3), 1.0 + (0.01 + 0.02 + clipped) / 3), atol=1e-5)
    noisy = _dp_round(_dp_strategy(noise=1.0), 1, updates=(0.01, 0.02, 10.0), broadcast=1.0)
    assert np.abs(noisy - mean).max() > 0.01  # std 1 * 0.5 / 3 per entry


def test_central_dp_accounts_epsilon_and_a_restored_strategy_continues_it():
    strategy = _dp_strategy(noise=1.0)
    _dp_round(strategy, 1)
    first = strategy.record.dp_epsilon
    assert strategy.record.dp_delta == 1e-5 and 0 < first < float("inf")
    state = strategy.strategy_state()  # what a checkpoint carries
    assert set(state) == {"accountant"}
    # A new server process: a fresh strategy, restored from the checkpointed state.
    restored = _dp_strategy(noise=1.0)
    assert restored.accountant.get_privacy_spent().epsilon != first  # nothing spent before the restore
    restored.load_strategy_state(state)
    assert restored.accountant.get_privacy_spent().epsilon == first
    # Round 2 composes on top of round 1, as in the uninterrupted strategy; without the restore it
    # would report round 1's epsilon again.
    _dp_round(strategy, 2)
    _dp_round(restored, 2)
    assert restored.record.dp_epsilon == strategy.record.dp_epsilon > first
    fresh = _dp_strategy(noise=1.0)
    _dp_round(fresh, 2)
    assert fresh.record.dp_epsilon == pytest.approx(first)


def test_central_dp_refuses_robust_aggregation():
    from fedpt.config import load_config

    with pytest.raises(FedPTError, match="privacy.dp = 'central' averages with FedAvg"):
        load_config(preset="tiny", overrides=["privacy.dp='central'", "federation.aggregation='median'"])


class _PartitionGrid:
    """Nodes with their partition ids; queries are answered by the real ClientApp."""

    def __init__(self, partitions: dict[int, int]) -> None:
        self.partitions, self.asked = partitions, 0

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Context

        from fedpt.federation.client_app import app

        replies = []
        for message in messages:
            self.asked += 1
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config={"partition-id": self.partitions[node]},
                              state=RecordDict(), run_config={})
            replies.append(app(message, context))
        return replies


def test_device_sampling_is_seeded_by_partition_not_by_node_id():
    from flwr.app import ConfigRecord

    def sampled(partitions, rnd, seed=0):
        strategy = FedPTStrategy(server=None, spec=SYSTEM_SPECS["fedavg-small"], round_log=RoundLog(None),
                                 num_rounds=9, fraction_train=0.5, min_train_nodes=3, min_available_nodes=6,
                                 fraction_evaluate=0.0, sampling_seed=seed)
        messages = strategy.configure_train(rnd, ArrayRecord([np.zeros(2, dtype=np.float32)]), ConfigRecord({}),
                                            _PartitionGrid(partitions))
        return sorted(partitions[m.metadata.dst_node_id] for m in messages)

    run_a = dict(zip([901, 17, 555, 42, 7, 300], range(6)))
    run_b = dict(zip([3, 88, 1000, 64, 12, 9], [5, 1, 0, 2, 4, 3]))  # another run: other ids, other order
    draws = [sampled(run_a, rnd) for rnd in range(1, 7)]
    assert draws == [sampled(run_b, rnd) for rnd in range(1, 7)]  # same partitions every run
    assert all(len(d) == 3 for d in draws) and len({tuple(d) for d in draws}) > 1  # varies by round
    assert [sampled(run_a, rnd, seed=1) for rnd in range(1, 7)] != draws  # and by seed
    strategy = FedPTStrategy(server=None, spec=SYSTEM_SPECS["fedavg-small"], round_log=RoundLog(None),
                             num_rounds=9, fraction_train=0.5, min_train_nodes=3, min_available_nodes=6,
                             fraction_evaluate=0.0)
    grid = _PartitionGrid(run_a)
    for rnd in (1, 2):
        strategy.configure_train(rnd, ArrayRecord([np.zeros(2, dtype=np.float32)]), ConfigRecord({}), grid)
    assert grid.asked == 6  # each node is asked its partition once


def test_central_dp_refuses_a_round_with_a_missing_device():
    from flwr.app import ConfigRecord

    from fedpt.config import load_config
    from fedpt.federation.driver import make_aggregator

    cfg = load_config(preset="tiny", overrides=["privacy.dp='central'", "federation.min_results=1"])
    sampling = dict(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3, fraction_evaluate=0.0)
    strategy = FedPTStrategy(server=None, spec=SYSTEM_SPECS["fedavg-small"], round_log=RoundLog(None), num_rounds=2,
                             aggregator=make_aggregator(cfg, **sampling), **sampling)
    strategy.configure_train(1, ArrayRecord([np.zeros((2, 3), dtype=np.float32)]), ConfigRecord({}), _Grid())
    replies = [_reply(1.0, 10, 1.0), _reply(1.0, 10, 1.0)]
    for reply, node in zip(replies, (11, 12)):
        reply.metadata.__dict__["_src_node_id"] = node
    with pytest.raises(FedPTError, match=r"central DP needs the updates of all 3 sampled devices.*2 valid.*node 13: no reply"):
        strategy.aggregate_train(1, replies)
