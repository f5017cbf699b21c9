"""Record keys and conversions between fedpt objects and Flower records (one place for key names)."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from fedpt.config import FedPTConfig

CONFIG_KEY = "fedpt-config"  # the resolved run config, as JSON (devices need model/data/train)
SYSTEM_KEY = "fedpt-system"  # which system this round belongs to
ARRAYS_KEY = "arrays"  # Flower's default ArrayRecord key
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"  # FedAvg weights by this
PARTITION_KEY = "partition-id"  # a device's answer to the server's one-time query (seeded sampling)
UNIFORM_WEIGHT_KEY = "uniform-weight"  # set by the server under central DP: every device weighs 1


def state_to_arrays(state: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord(state)


def arrays_to_state(arrays: ArrayRecord) -> dict[str, Any]:
    return arrays.to_torch_state_dict()


def train_config(cfg: FedPTConfig, system: str) -> ConfigRecord:
    return ConfigRecord({CONFIG_KEY: cfg.to_json(), SYSTEM_KEY: system})


def message_config(msg: Message) -> tuple[FedPTConfig, ConfigRecord] | None:
    """The run config a training message carries, and its config record (for ``server-round``).

    Message API: record ``config``; SecAgg+'s training stage: ``fitins.config``. None for other
    messages (SecAgg+'s key exchange, queries), which client mods pass through untouched.
    """
    records = msg.content.config_records
    config = records.get("config") or records.get("fitins.config")
    if config is None or CONFIG_KEY not in config:
        return None
    return FedPTConfig.from_json(str(config[CONFIG_KEY])), config
