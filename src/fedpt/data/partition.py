"""Split device data among clients with flwr-datasets partitioners (IID or Dirichlet by category)."""

from __future__ import annotations

from fedpt.config import DataConfig
from fedpt.data.records import Example
from fedpt.errors import FedPTError


def partition_examples(
    examples: list[Example], num_partitions: int, partition_id: int, cfg: DataConfig, seed: int
) -> list[Example]:
    """Deterministic partition ``partition_id`` of ``num_partitions`` (same on every device)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if not 0 <= partition_id < num_partitions:
        raise FedPTError(f"partition-id {partition_id} is out of range for {num_partitions} partitions")
    if len(examples) < num_partitions:
        raise FedPTError(_empty(partition_id, len(examples), num_partitions))
    if cfg.partitioner == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="category",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=1,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    # Offline use: hand the partitioner a local Dataset instead of a hub download.
    partitioner.dataset = Dataset.from_dict({"row": list(range(len(examples))),
                                             "category": [ex.category for ex in examples]})
    try:
        rows = partitioner.load_partition(partition_id)["row"]
    except (ValueError, IndexError) as err:
        raise FedPTError(f"could not partition {len(examples)} records into {num_partitions} parts: {err}") from None
    if not rows:
        raise FedPTError(_empty(partition_id, len(examples), num_partitions))
    return [examples[i] for i in rows]


def _empty(partition_id: int, records: int, clients: int) -> str:
    return (f"client {partition_id}'s partition is empty ({records} device records, {clients} clients); "
            "use fewer clients, more data or a larger data.dirichlet_alpha")


def category_histogram(partitions: list[list[Example]]) -> dict[str, list[int]]:
    """Per-category counts per client, for the run's data report."""
    categories = sorted({ex.category for part in partitions for ex in part})
    return {c: [sum(ex.category == c for ex in part) for part in partitions] for c in categories}
