"""The device: receive the global adapter, LoRA-tune it on local data (step 2), send it back.

The reply carries the adapter arrays and metrics (``num-examples`` for FedAvg's weights, the
train loss, time, tokens): never data, never the base model.

Which data is local: a SuperNode started with ``--node-config "data-path=FILE.jsonl"`` trains
on that file; otherwise (simulation) it takes partition ``partition-id`` of
``num-partitions`` of the run's device split, the same on every device.
"""

from __future__ import annotations

import resource
import time
from functools import lru_cache
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpt.config import FedPTConfig
from fedpt.data.partition import partition_examples
from fedpt.data.records import Example, load_examples
from fedpt.faults import inject_device_faults
from fedpt.federation.records import (ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, SYSTEM_KEY,
                                      arrays_to_state, state_to_arrays)
from fedpt.models.lora import attach_lora, get_adapter_state, set_adapter_state
from fedpt.systems import SYSTEM_SPECS
from fedpt.train import local_tune

app = ClientApp(mods=[inject_device_faults])  # faults: off unless [faults] asks


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Step 2 of a FedPT round: local LoRA SFT of the broadcast adapter."""
    config = msg.content["config"]
    state, metrics = tune_on_device(str(config[CONFIG_KEY]), str(config[SYSTEM_KEY]), int(config["server-round"]),
                                    arrays_to_state(msg.content[ARRAYS_KEY]), context)
    content = RecordDict({ARRAYS_KEY: state_to_arrays(state), METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def tune_on_device(cfg_json: str, system: str, server_round: int, adapter: dict[str, Any],
                   context: Context) -> tuple[dict[str, Any], dict[str, int | float]]:
    """LoRA-tune ``adapter`` on this device's data; returns the new adapter and the metrics to send."""
    cfg = FedPTConfig.from_json(cfg_json)
    spec = SYSTEM_SPECS[system]
    examples, partition_id = device_examples(cfg, context)
    model_spec = cfg.model.small if spec.device_model == "small" else cfg.model.large
    model, tokenizer = device_model(model_spec, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha,
                                    cfg.lora.dropout, tuple(cfg.lora.targets))
    set_adapter_state(model, adapter)
    start = time.perf_counter()
    result = local_tune(model, tokenizer, examples, cfg.data, cfg.train,
                        seed=(cfg.run.seed * 1000 + server_round) * 1000 + partition_id)
    metrics = {
        NUM_EXAMPLES_KEY: result.num_examples,
        "train_loss": result.loss,
        "train_last_loss": result.last_loss,
        "train_tokens": result.tokens,
        "train_seconds": time.perf_counter() - start,
        # Peak resident memory of this device process so far (model + training), for cost tables.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    return get_adapter_state(model), metrics


def device_examples(cfg: FedPTConfig, context: Context) -> tuple[list[Example], int]:
    """This device's training examples and its partition id."""
    node = context.node_config
    if "data-path" in node:
        return load_examples(str(node["data-path"])), int(node.get("partition-id", 0))
    partition_id = int(node["partition-id"])
    return _partition(cfg.data.source, cfg.to_json(), partition_id, int(node["num-partitions"])), partition_id


@lru_cache(maxsize=4)
def _partition(source: str, cfg_json: str, partition_id: int, num_partitions: int) -> list[Example]:
    # Cached per process: a simulated device reuses its partition every round.
    from fedpt.server import load_splits

    cfg = FedPTConfig.from_json(cfg_json)
    return partition_examples(load_splits(cfg).train, num_partitions, partition_id, cfg.data, cfg.data.split_seed)


@lru_cache(maxsize=1)  # one base model per device process: a real device holds one LM, not two
def device_model(spec: str, dtype: str, rank: int, alpha: float, dropout: float,
                 targets: tuple[str, ...]) -> tuple[Any, Any]:
    """The device's base LM with a LoRA adapter, loaded once per process and reused every round.

    The adapter's initial values do not matter: every round overwrites them with the broadcast.
    """
    from fedpt.config import LoraConfig
    from fedpt.models.loading import load_model, load_tokenizer

    lora = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))
    return attach_lora(load_model(spec, dtype), lora, seed=0), load_tokenizer(spec)
