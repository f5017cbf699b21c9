"""Local differential privacy: clipping, calibrated noise, the ClientApp's noised reply, epsilon reporting."""

import math

import numpy as np
import pytest
import torch

from fedpt.federation.local_dp import LocalDp, privatize


def test_privatize_clips_the_update_not_the_adapter():
    broadcast = {"a": torch.full((4, 4), 3.0), "b": torch.zeros(8)}
    far = {"a": broadcast["a"] + 10.0, "b": torch.full((8,), 10.0)}  # update norm 10 * sqrt(24)
    out = privatize(broadcast, far, clipping_norm=0.5, sigma=0.0, generator=torch.Generator().manual_seed(0))
    norm = math.sqrt(sum(float((out[k] - broadcast[k]).pow(2).sum()) for k in out))
    assert norm == pytest.approx(0.5, rel=1e-6)
    near = {"a": broadcast["a"] + 0.01, "b": torch.zeros(8)}  # norm 0.04 < clip: untouched
    out = privatize(broadcast, near, clipping_norm=0.5, sigma=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out["a"], near["a"]) and out["a"].dtype == torch.float32


def test_noise_has_the_calibrated_std_and_is_seeded():
    dp = LocalDp(epsilon=0.5, delta=1e-5, clipping_norm=0.1)
    assert dp.sigma == pytest.approx(2 * 0.1 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5)  # 1.94
    zeros = {"w": torch.zeros(200_000, dtype=torch.bfloat16)}
    a = privatize(zeros, zeros, dp.clipping_norm, dp.sigma, torch.Generator().manual_seed(3))
    b = privatize(zeros, zeros, dp.clipping_norm, dp.sigma, torch.Generator().manual_seed(3))
    assert a["w"].dtype == torch.bfloat16 and torch.equal(a["w"], b["w"])
    assert float(a["w"].float().std()) == pytest.approx(dp.sigma, rel=0.02)
    assert dp.spent(3) == pytest.approx((1.5, 3e-5))  # basic composition over rounds


def test_the_client_app_sends_a_noised_update_under_local_dp(tiny_cfg, fedpt_home):
    from flwr.app import ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpt.config import load_config
    from fedpt.federation.client_app import app
    from fedpt.federation.device import device_model
    from fedpt.federation.records import train_config
    from fedpt.models.lora import get_adapter_state

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def reply(dp: str) -> dict:
        cfg = load_config(preset="tiny", overrides=["train.steps=1", f"privacy.dp='{dp}'", "privacy.local_epsilon=1.0",
                                                    "privacy.clipping_norm=0.05"])
        model, _ = device_model(cfg.model.small, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                tuple(cfg.lora.targets))
        config = train_config(cfg, "fedpt")
        config["server-round"] = 1
        msg = Message(content=RecordDict({"arrays": ArrayRecord(broadcast), "config": config}), dst_node_id=0,
                      message_type="train")
        context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 3},
                          state=RecordDict(), run_config={})
        return app(msg, context).content["arrays"].to_torch_state_dict()

    cfg = tiny_cfg
    model, _ = device_model(cfg.model.small, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                            tuple(cfg.lora.targets))
    broadcast = {k: v.clone() for k, v in get_adapter_state(model).items()}
    plain, noised, again = reply("off"), reply("local"), reply("local")
    assert plain.keys() == noised.keys() and all(plain[k].shape == noised[k].shape for k in plain)
    distance = math.sqrt(sum(float((noised[k].double() - plain[k].double()).pow(2).sum()) for k in plain))
    params = sum(v.numel() for v in plain.values())
    sigma = LocalDp(1.0, 1e-5, 0.05).sigma
    assert distance == pytest.approx(sigma * math.sqrt(params), rel=0.05)  # the noise dominates
    # Fresh noise every release: the server knows the run's seed, so seeded noise could be removed.
    assert not any(torch.equal(noised[k], again[k]) for k in noised)


def test_local_dp_epsilon_is_reported_per_round():
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from fedpt.federation.strategy import FedPTStrategy
    from fedpt.metrics import RoundLog
    from fedpt.systems import SYSTEM_SPECS

    strategy = FedPTStrategy(server=None, spec=SYSTEM_SPECS["fedavg-small"], round_log=RoundLog(None), num_rounds=3,
                             fraction_evaluate=0.0, local_dp=LocalDp(0.5, 1e-5, 1.0))
    strategy._broadcast = {"0": torch.zeros(2, 3)}
    reply = Message(RecordDict({"arrays": ArrayRecord([np.ones((2, 3), dtype=np.float32)]), "metrics": MetricRecord(
        {"num-examples": 4, "train_loss": 1.0, "train_seconds": 1.0, "train_tokens": 10})}),
        dst_node_id=0, message_type="train")
    strategy.aggregate_train(2, [reply])
    assert (strategy.record.dp_epsilon, strategy.record.dp_delta) == pytest.approx((1.0, 2e-5))


def test_local_dp_settings_are_checked():
    from fedpt.config import load_config
    from fedpt.errors import FedPTError

    with pytest.raises(FedPTError, match=r"privacy.local_epsilon must be in \(0, 1\]"):
        load_config(preset="tiny", overrides=["privacy.dp='local'", "privacy.local_epsilon=3"])
    with pytest.raises(FedPTError, match="not implemented for SecAgg"):
        load_config(preset="tiny", overrides=["privacy.dp='local'", "federation.secure_aggregation=true"])
