"""FedPT and its baselines are configurations of one pipeline, not copies of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedpt.config import FedPTConfig
    from fedpt.metrics import RoundRecord


@dataclass(frozen=True)
class SystemSpec:
    name: str
    device_model: str  # which LM the devices LoRA-tune: "small" or "large"
    proxy: bool  # evaluate the proxy-tuned large LM (large + alpha * (tuned small - base small))
    distill: bool  # distill the proxy-tuned large LM into the small LM every round
    summary: str


SYSTEM_SPECS: dict[str, SystemSpec] = {
    spec.name: spec
    for spec in (
        SystemSpec("fedpt", "small", proxy=True, distill=True,
                   summary="FedAvg on the small LM, proxy-tune the large LM, distill it back, every round"),
        SystemSpec("fedavg-small", "small", proxy=False, distill=False,
                   summary="FedAvg LoRA on the small LM only"),
        SystemSpec("fedavg-large", "large", proxy=False, distill=False,
                   summary="FedAvg LoRA on the large LM (white-box, big devices): the quality reference"),
        SystemSpec("fedavg-pt", "small", proxy=True, distill=False,
                   summary="FedAvg on the small LM, proxy-tune the large LM at evaluation, no distillation"),
    )
}


def training_groups(systems: list[str]) -> list[list[str]]:
    """The systems of a run grouped by identical device training, in run order.

    FedAvg+PT is FedAvg-small's training with the proxy-tuned large LM evaluated on top: same
    device model, no distillation, and every seed depends on (run seed, round, device), never on
    the system. Such systems share one strategy (one set of device rounds) instead of training
    twice; each still gets its own records, predictions, checkpoints and adapter.
    """
    groups: dict[tuple[str, bool], list[str]] = {}
    for name in systems:
        spec = SYSTEM_SPECS[name]
        groups.setdefault((spec.device_model, spec.distill), []).append(name)
    return list(groups.values())


def target_met(cfg: "FedPTConfig", system: str, records: list[dict]) -> bool:
    """Did ``system`` stop at ``federation.target_rouge_l`` (its proxy-tuned large LM's held-out Rouge-L)?"""
    target = cfg.federation.target_rouge_l
    if not target or not SYSTEM_SPECS[system].proxy or not records:
        return False
    last = max(records, key=lambda row: row["round"])
    return last["round"] > 0 and last.get("rougeL_proxy") is not None and last["rougeL_proxy"] >= target


def system_finished(cfg: "FedPTConfig", system: str, records: list["RoundRecord"]) -> bool:
    """Every round recorded, or stopped at the target."""
    rows = [r.__dict__ for r in records if r.system == system]
    return any(row["round"] >= cfg.federation.rounds for row in rows) or target_met(cfg, system, rows)
