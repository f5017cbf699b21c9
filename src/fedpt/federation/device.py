"""A device's side of a round, independent of the message format: its data, its model, its tuning.

``client_app.train`` (message API) and ``secagg.train_masked`` (SecAgg+'s legacy records) both
call ``tune_on_device``.

Which data is local: a SuperNode started with ``--node-config "data-path=FILE.jsonl"`` trains
on that file; otherwise (simulation) it takes partition ``partition-id`` of
``num-partitions`` of the run's device split, the same on every device.
"""

from __future__ import annotations

import random
import resource
import time
from functools import lru_cache
from typing import Any

import torch
from flwr.app import Context

from fedpt.config import FedPTConfig
from fedpt.data.partition import partition_examples
from fedpt.data.records import Example, load_examples
from fedpt.federation.core_share import device_busy, governed_threads
from fedpt.federation.records import NUM_EXAMPLES_KEY, PARTITION_KEY
from fedpt.models.lora import attach_lora, get_adapter_state, set_adapter_state
from fedpt.systems import SYSTEM_SPECS
from fedpt.train import local_tune


def tune_on_device(cfg_json: str, system: str, server_round: int, adapter: dict[str, Any],
                   context: Context) -> tuple[dict[str, Any], dict[str, int | float]]:
    """LoRA-tune ``adapter`` on this device's data; returns the new adapter and the metrics to send."""
    called = time.perf_counter()
    cfg = FedPTConfig.from_json(cfg_json)
    spec = SYSTEM_SPECS[system]
    with device_busy(cfg.federation.share_idle_cores) as share:  # busy from set-up on: loading uses a core
        examples, partition_id = device_examples(cfg, context)
        model_spec = cfg.model.small if spec.device_model == "small" else cfg.model.large
        model, tokenizer = device_model(model_spec, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha,
                                        cfg.lora.dropout, tuple(cfg.lora.targets))
        set_adapter_state(model, adapter)
        start = time.perf_counter()
        with governed_threads(model, share) as governor:
            result = local_tune(model, tokenizer, examples, cfg.data, cfg.train,
                                seed=(cfg.run.seed * 1000 + server_round) * 1000 + partition_id)
    metrics = {
        NUM_EXAMPLES_KEY: result.num_examples,
        "train_loss": result.loss,
        "train_last_loss": result.last_loss,
        "train_tokens": result.tokens,
        "train_seconds": time.perf_counter() - start,
        # Data and model set-up before training (the model loads in a process's first round only),
        # and which process trained: the server tells the devices' critical path from these.
        "prepare_seconds": start - called,
        "device_process": PROCESS_TOKEN,
        # The most torch threads it trained on (more than its own when it took an idle sibling's cores).
        "train_threads_max": max([torch.get_num_threads(), *(governor.changes if governor else [])]),
        # Decoder layers per step that kept their activations instead of recomputing them
        # (train.activation_memory_mb), a mean over the round's steps.
        "train_layers_kept": result.layers_kept,
        # Peak resident memory of this device process so far (model + training), for cost tables.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        PARTITION_KEY: partition_id,  # which device this was, for the round's record
    }
    return get_adapter_state(model), metrics


# Which process trained, as the device tells the server: a random number drawn once per process,
# so replies from one process share it and it says nothing of the machine (no host name or pid
# leaves the device). 52 bits: a float64 holds it exactly, should it become one.
PROCESS_TOKEN = random.SystemRandom().getrandbits(52)


def device_examples(cfg: FedPTConfig, context: Context) -> tuple[list[Example], int]:
    """This device's training examples and its partition id."""
    node = context.node_config
    if "data-path" in node:  # a real device: its own file, checked on first use (errors name file and line)
        return _local_file(str(node["data-path"])), int(node.get("partition-id", 0))
    partition_id = int(node["partition-id"])
    return _partition(cfg.data.source, cfg.to_json(), partition_id, int(node["num-partitions"])), partition_id


@lru_cache(maxsize=1)
def _local_file(path: str) -> list[Example]:
    # A broken or non-UTF-8 file raises FedPTError("<file>:<line>: ..."): the ClientApp fails this
    # round, and the server logs and counts it as this device's failure with that reason.
    return load_examples(path)


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
    from fedpt.models.loading import load_model_for_training, load_tokenizer

    lora = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))
    return attach_lora(load_model_for_training(spec, dtype), lora, seed=0), load_tokenizer(spec)
