import numpy as np
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
    replies = [_reply(1.0, 10, 2.0), _reply(4.0, 30, 1.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    (mean,) = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(mean, np.full((2, 3), (1.0 * 10 + 4.0 * 30) / 40))
    assert metrics["train_loss"] == pytest.approx((2.0 * 10 + 1.0 * 30) / 40)
    assert strategy._record.device_peak_memory_bytes == 30_000 and strategy._record.device_train_tokens == 50
    assert strategy._record.clients == 2 and strategy._record.bytes_up == 2 * replies[0].content["arrays"].count_bytes()


def test_round_with_no_updates_fails_with_the_reason():
    with pytest.raises(FedPTError, match="round 1: no device returned an update"):
        _strategy().aggregate_train(1, [])
