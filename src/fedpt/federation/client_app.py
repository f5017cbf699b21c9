"""The device: receive the global adapter, LoRA-tune it on local data (step 2), send it back.

The reply carries the adapter arrays and metrics (``num-examples`` for FedAvg's weights, the
train loss, time, tokens): never data, never the base model. The tuning itself is
``fedpt.federation.device.tune_on_device``.

One ClientApp serves both aggregation modes: plain (message API: ``arrays`` + ``config`` in,
``arrays`` + ``metrics`` out) and secure aggregation (``federation.secure_aggregation``:
Flower's ``secaggplus_mod`` runs the protocol and hands the training stage over in its legacy
``fitins.*`` records; ``fedpt.federation.secagg.train_masked`` answers it).
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpt.faults import inject_device_faults, pause_point
from fedpt.federation.device import tune_on_device
from fedpt.federation.local_dp import local_dp_mod
from fedpt.federation.records import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, PARTITION_KEY, SYSTEM_KEY, arrays_to_state,
                                     state_to_arrays)
from fedpt.federation.secagg import LEGACY_FIT_KEY, optional_secagg, train_masked

# SecAgg+ outermost: it runs key agreement and unmasking itself and calls through (faults, then
# `train`) only in the stage that collects the masked vectors. Faults are off unless [faults]
# asks; local DP (innermost: it noises what `train` returns) unless privacy.dp = "local".
app = ClientApp(mods=[optional_secagg, inject_device_faults, local_dp_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Step 2 of a FedPT round: local LoRA SFT of the broadcast adapter."""
    if LEGACY_FIT_KEY in msg.content.array_records:  # secure aggregation's training stage
        return train_masked(msg, context)
    config = msg.content["config"]
    pause_point("device-training", int(config["server-round"]))  # FEDPT_PAUSE_AT: signal tests stop the run here
    state, metrics = tune_on_device(str(config[CONFIG_KEY]), str(config[SYSTEM_KEY]), int(config["server-round"]),
                                    arrays_to_state(msg.content[ARRAYS_KEY]), context)
    content = RecordDict({ARRAYS_KEY: state_to_arrays(state), METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which partition this device trains on (asked once, so the server can sample reproducibly)."""
    partition = int(context.node_config.get("partition-id", -1))
    return Message(RecordDict({METRICS_KEY: MetricRecord({PARTITION_KEY: partition})}), reply_to=msg)
