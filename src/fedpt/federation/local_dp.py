"""Local differential privacy: each device clips and noises its own update before it leaves.

``privacy.dp = "local"``. The device's update (tuned - broadcast adapter) is clipped to L2 norm
``privacy.clipping_norm`` and Gaussian noise is added, calibrated by the classic Gaussian
mechanism: ``sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` with ``epsilon =
privacy.local_epsilon <= 1`` per round. The sensitivity is ``2 * clipping_norm``: two
datasets of the same device can move its clipped update anywhere in the ball, so the
diameter bounds the change. The server never sees an un-noised update, so this holds
even against the server. Over rounds the guarantee composes: we report basic composition
(``rounds * epsilon``, ``rounds * delta``), an upper bound for any device.

Flower's own ``LocalDpMod`` reads and writes the legacy ``fitres`` records and takes the
sensitivity as a free parameter, so it cannot wrap this message-API ClientApp; this mod
does the same mechanism on ``ArrayRecord`` replies, in torch (bf16 adapters included). The
noise comes from a fresh OS-random seed each release: noise a seed in the config could
reproduce would be noise the server could remove.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Message

from fedpt.federation.records import ARRAYS_KEY, arrays_to_state, message_config, state_to_arrays


@dataclass(frozen=True)
class LocalDp:
    """One device release per round: clip, then Gaussian noise of std ``sigma``."""

    epsilon: float
    delta: float
    clipping_norm: float

    @property
    def sigma(self) -> float:
        return 2 * self.clipping_norm * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon

    def spent(self, rounds: int) -> tuple[float, float]:
        """(epsilon, delta) after ``rounds`` releases, by basic composition."""
        return rounds * self.epsilon, rounds * self.delta


def privatize(broadcast: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], clipping_norm: float,
              sigma: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``broadcast + clip(tuned - broadcast) + N(0, sigma^2)``, computed in float64, returned in each dtype."""
    update = {k: tuned[k].double() - broadcast[k].double() for k in broadcast}
    norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: (broadcast[k].double() + u * scale
                + sigma * torch.randn(u.shape, generator=generator, dtype=torch.float64)).to(tuned[k].dtype)
            for k, u in update.items()}


def local_dp_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower client mod: privatize this device's reply when the run asks for local DP."""
    reply = call_next(msg, context)
    found = message_config(msg)
    if reply.has_error() or found is None or ARRAYS_KEY not in msg.content:
        return reply
    cfg = found[0]
    if cfg.privacy.dp != "local":
        return reply
    dp = LocalDp(cfg.privacy.local_epsilon, cfg.privacy.delta, cfg.privacy.clipping_norm)
    # Never seeded from the run's seed: the server knows it and could regenerate and subtract
    # the noise. DP runs are therefore not bit-reproducible, by design.
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    noised = privatize(arrays_to_state(msg.content[ARRAYS_KEY]), arrays_to_state(reply.content[ARRAYS_KEY]),
                       dp.clipping_norm, dp.sigma, generator)
    reply.content[ARRAYS_KEY] = state_to_arrays(noised)
    return reply


def local_dp_from_config(cfg: Any) -> LocalDp | None:
    privacy = cfg.privacy
    return LocalDp(privacy.local_epsilon, privacy.delta, privacy.clipping_norm) if privacy.dp == "local" else None
