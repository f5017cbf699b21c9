"""Live progress for a run: one bar over all rounds of all systems (phase, devices, ETA)."""

from __future__ import annotations

import sys

from fedpt.metrics import RoundRecord


class Progress:
    """A tqdm bar on stderr; a one-line summary per finished round above it."""

    def __init__(self, systems: list[str], rounds: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.rounds = rounds
        self.bar = tqdm(total=len(systems) * rounds, unit="round", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} rounds "
                                                       "[{elapsed}<{remaining}]")

    def phase(self, system: str, server_round: int, phase: str) -> None:
        self.bar.set_description_str(f"{system} round {server_round}/{self.rounds}: {phase}")

    def skip(self, rounds: int) -> None:
        """Rounds finished by an earlier run (resume)."""
        self.bar.update(rounds)

    def round_done(self, record: RoundRecord) -> None:
        self.bar.write(describe_round(record), file=sys.stderr)
        if record.round > 0:
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def describe_round(r: RoundRecord) -> str:
    parts = [f"[{r.system}] round {r.round}"]
    if r.round > 0:
        parts.append(f"devices {r.clients}" + (f" ({r.failures} failed)" if r.failures else ""))
    if r.train_loss is not None:
        parts.append(f"train loss {r.train_loss:.3f}")
    if r.kd_kl_before is not None:
        parts.append(f"KD KL {r.kd_kl_before:.3f}->{r.kd_kl_after:.3f}")
    for name, value in (("small", r.rougeL_small), ("proxy", r.rougeL_proxy), ("large", r.rougeL_large)):
        if value is not None:
            parts.append(f"Rouge-L {name} {value:.2f}")
    parts.append(f"{r.seconds:.1f}s")
    return " | ".join(parts)
