"""Secure aggregation (SecAgg+) for FedPT: the server learns only the weighted mean of the device updates.

Flower 1.42 ships SecAgg+ for its *legacy* API only: ``SecAggPlusWorkflow`` runs inside
``DefaultWorkflow`` on a ``LegacyContext`` with a legacy ``flwr.server.strategy.Strategy``, and the
device side is the client mod ``secaggplus_mod``. With ``federation.secure_aggregation = true``,
``server_app.run_systems`` drives each system's rounds through ``run_secagg_system`` (this legacy
workflow) instead of ``FedPTStrategy.start``; everything else is shared: ``FedPTStrategy`` does the
proxy-tuning + distillation, evaluation, round records and checkpoints, the one ClientApp
(``client_app.app``) answers both message formats, ``tune_on_device`` tunes.

How one round goes (four message exchanges per round instead of one):

1. ``configure_fit`` samples the devices; the workflow runs key agreement (stages *setup*, *share keys*).
2. Stage *collect masked vectors* delivers the broadcast adapter in the legacy ``fitins.*`` records.
   ``secaggplus_mod`` hands it to ``train`` below (a message-API ``@app.train()`` function: the mod
   wraps it like any function of the ClientApp, but it must read ``fitins.*`` and reply ``fitres.*``).
   The device replies with its **update** (tuned - broadcast, float64) and ``num_examples``; the mod
   scales the update by ``w = num_examples / max_weight``, clips each entry to
   ``[-clipping_range, clipping_range]``, quantizes it stochastically to ``[0, quantization_range]``,
   masks it and uploads int64 vectors. Metrics and ``num_examples`` travel in clear; the update does not.
3. Stage *unmask*: the server removes the masks from the *sum* and gets
   ``sum_i w_i u_i / sum_i w_i`` -- FedAvg's example-weighted mean of the updates -- which is what the
   legacy ``aggregate_fit`` receives (as every ``FitRes.parameters``, one shared array list).
4. ``SecAggFedPT.aggregate_fit`` adds it to the broadcast (= FedAvg of the adapters) and runs
   FedPT's steps 4-5 through ``FedPTStrategy.proxy_tune_and_distill``; ``evaluate`` is
   ``FedPTStrategy.evaluate`` (records, progress, checkpoints).

Why updates and not adapters: the quantizer needs a fixed range. An update's entries are bounded by
the optimizer (``default_clipping_range``), small and centred on 0, so a tight range loses nothing;
the adapter's A matrices are not small and not centred.

What the server can no longer do: look at one device's update. Robust aggregation (median, trimmed
mean, Krum) and server-side DP clipping need individual updates and are refused by the config's
validation. The per-update checks move to the device (``check_own_update``: NaN/Inf,
``max_update_norm``; a failing device drops out and its masks are removed), the mod clips every
scaled entry to ``+-clipping_range`` (devices report how many), and the server checks the *mean*
update (shapes, finite, L2 norm <= ``max_update_norm``), a bad one failing the round. All of this
holds for buggy devices, not malicious ones: a device can upload any integers (SecAgg+ has no range
proofs) and corrupt the sum; the check of the mean is then the only defence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
import torch

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, FitIns, FitRes, NDArrays, Parameters, Scalar, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.serverapp import Grid

from fedpt.config import FedPTConfig, TrainConfig
from fedpt.errors import FedPTError
from fedpt.federation.device import tune_on_device
from fedpt.federation.records import CONFIG_KEY, NUM_EXAMPLES_KEY, SYSTEM_KEY, state_to_arrays
from fedpt.federation.strategy import FedPTStrategy, _error_reason

ADAPTER_KEYS_KEY = "fedpt-adapter-keys"  # legacy Parameters have no names: the state-dict keys, "\n"-joined
CLIP_KEY = "fedpt-secagg-clip"  # the devices count the entries the quantizer will clip ...
MAX_WEIGHT_KEY = "fedpt-secagg-max-weight"  # ... after scaling by num_examples / max_weight
CLIPPED_KEY = "secagg-clipped"  # metric: entries of this device's scaled update outside the range

# Worst case of |m_hat / sqrt(v_hat)| for Adam(W) with torch's betas (0.9, 0.999), any gradients:
# (1 - b1) / sqrt(1 - b2) * sqrt(1 / (1 - b1^2 / b2)) = 3.162 * 2.299 = 7.27 (Cauchy-Schwarz over the
# moment sums; bias correction only lowers it). One step moves an entry by at most lr * (7.27 + wd |p|).
ADAM_STEP_BOUND = 7.3
MODULUS_RANGE = 2**32  # Flower's default and documented maximum for the masks


# -- protocol settings ---------------------------------------------------------------------------------

@dataclass
class SecAggSettings:
    """SecAgg+ parameters (see ``secagg_settings`` for how each default is chosen)."""

    clipping_range: float
    quantization_range: int
    max_weight: float
    num_shares: float | int = 1.0  # fraction of the sampled devices each one shares its keys with
    reconstruction_threshold: float | int = 2 / 3  # > 1/2: a lying server cannot get both secrets of a device
    modulus_range: int = MODULUS_RANGE
    timeout: float | None = None

    def error_bound(self, devices: int, total_examples: float) -> float:
        """Largest deviation of an entry of the SecAgg+ mean from the exact FedAvg mean.

        Each device's stochastic rounding is off by < 1 quantization step ``2c / Q``; the sum of
        ``devices`` of them is divided by the total weight ``sum w_i = total_examples / max_weight``.
        (Rounding the weights themselves to multiples of ``1 / Q`` adds ~``devices / Q`` relative
        error, far below this; float64 arithmetic adds nothing visible.)
        """
        step = 2 * self.clipping_range / self.quantization_range
        return devices * step * self.max_weight / total_examples


def default_clipping_range(train: TrainConfig, max_abs_weight: float = 1.0) -> float:
    """A bound on every entry of a device's update: ``steps * lr * (7.3 + weight_decay * max|p|)``.

    AdamW moves an entry by at most ``lr * ADAM_STEP_BOUND`` per step plus its decoupled decay
    (LoRA entries are far below 1: A ~ U(+-1/sqrt(fan_in)), B starts at 0). Gradient clipping does not
    help (Adam is scale-free), so this is the bound; it never clips an honest device's update
    (scaled by ``w <= 1``), and with ``quantization_range`` ~ 2^30 its resolution is ~1e-10.
    """
    return train.steps * train.lr * (ADAM_STEP_BOUND + train.weight_decay * max_abs_weight)


def default_quantization_range(devices: int, modulus_range: int = MODULUS_RANGE) -> int:
    """The largest power of two ``Q`` with ``devices * Q < modulus_range`` (and ``Q <= 2^30``).

    Each quantized entry lies in ``[0, Q]``; the unmasked sum of ``devices`` of them (and of the
    weights, also ``<= Q`` each) must not wrap around the modulus. ``2^30`` keeps the mod's int32
    rounding safe. Flower's default 2^22 works up to 1023 devices but is 256x coarser for small cohorts.
    """
    return min(2**30, 2 ** int(math.floor(math.log2((modulus_range - 1) / devices))))


def secagg_settings(cfg: FedPTConfig, max_weight: float, **overrides: Any) -> SecAggSettings:
    """Settings from the run config; ``max_weight`` bounds any device's ``num_examples``.

    ``max_weight`` should be close to the largest local dataset: each update is scaled by
    ``num_examples / max_weight`` before quantization, so a far larger value costs resolution
    (``error_bound`` grows with it); a smaller one lets a large device's update be clipped.
    """
    fed = cfg.federation
    settings = SecAggSettings(clipping_range=default_clipping_range(cfg.train),
                              quantization_range=default_quantization_range(fed.clients_per_round),
                              max_weight=float(max_weight), timeout=fed.round_timeout)
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise FedPTError(f"unknown SecAgg+ setting {key!r}")
        setattr(settings, key, value)
    return settings


# -- device side ---------------------------------------------------------------------------------------

LEGACY_FIT_KEY = "fitins.parameters"  # the broadcast, as SecAgg+'s training stage delivers it


def optional_secagg(msg: Message, context: Context, call_next: Any) -> Message:
    """``secaggplus_mod`` for messages of the SecAgg+ protocol; every other message passes through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def train_masked(msg: Message, context: Context) -> Message:
    """Step 2 under SecAgg+: legacy ``fitins`` in, the adapter *update* out as ``fitres`` (the mod masks it)."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    keys = str(config[ADAPTER_KEYS_KEY]).split("\n")
    broadcast = to_state(keys, fitins.parameters)
    server_round = int(config["server-round"])
    state, metrics = tune_on_device(str(config[CONFIG_KEY]), str(config[SYSTEM_KEY]), server_round, broadcast,
                                    context)
    update = [(state[k].double() - broadcast[k].double()).numpy() for k in keys]  # float64: exact quantizer input
    cfg = FedPTConfig.from_json(str(config[CONFIG_KEY]))
    check_own_update(update, cfg.federation.max_update_norm)
    scale = float(metrics[NUM_EXAMPLES_KEY]) / float(config[MAX_WEIGHT_KEY])
    clip = float(config[CLIP_KEY])
    metrics[CLIPPED_KEY] = int(sum(np.count_nonzero(np.abs(u) * scale > clip) for u in update))
    # The mod's stochastic rounding draws from numpy's global RNG right after this returns: seeding it
    # like the local training makes a SecAgg+ run reproducible (the masks use os.urandom, unaffected).
    partition_id = int(context.node_config.get("partition-id", 0))
    np.random.seed(((cfg.run.seed * 1000 + server_round) * 1000 + partition_id) % 2**32)
    fitres = FitRes(status=Status(Code.OK, "ok"), parameters=ndarrays_to_parameters(update),
                    num_examples=int(metrics[NUM_EXAMPLES_KEY]), metrics=dict(metrics))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def check_own_update(update: NDArrays, max_update_norm: float) -> None:
    """The server's per-update checks, done by the device on itself before masking.

    The server can no longer reject one update, so a device refuses to submit a bad one: it then
    drops out of the round and SecAgg+ removes its masks. (NaN would not even survive the mod:
    its integer cast turns it into an arbitrary finite value that silently corrupts the sum.)
    """
    if not all(np.isfinite(u).all() for u in update):
        raise FedPTError("this device's update holds NaN or Inf: not submitted")
    norm = math.sqrt(sum(float(np.square(u).sum()) for u in update))
    if max_update_norm and norm > max_update_norm:
        raise FedPTError(f"update norm {norm:.3g} exceeds federation.max_update_norm={max_update_norm}: "
                         "not submitted")


def to_state(keys: list[str], parameters: Parameters) -> dict[str, torch.Tensor]:
    """Legacy Parameters (ordered, unnamed numpy arrays) -> an adapter state dict."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(keys):
        raise FedPTError(f"{len(arrays)} arrays for {len(keys)} adapter keys")
    return {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays)}


def to_parameters(keys: list[str], state: dict[str, Any]) -> Parameters:
    return ndarrays_to_parameters([state[k].detach().cpu().numpy() for k in keys])


# -- server side ---------------------------------------------------------------------------------------

class SecAggFedPT(LegacyFedAvg):
    """The legacy strategy SecAgg+ drives: FedAvg's sampling, FedPT's steps 4-5 and evaluation.

    ``aggregate_fit`` receives one ``(proxy, FitRes)`` per device whose masked update made it into the
    sum; every ``FitRes.parameters`` is the *same* unmasked weighted mean update; ``num_examples`` and
    ``metrics`` are each device's own (sent in clear).
    """

    def __init__(self, fedpt: FedPTStrategy, cfg: FedPTConfig, system: str, keys: list[str],
                 initial: dict[str, Any], settings: SecAggSettings, **sampling: Any) -> None:
        super().__init__(initial_parameters=to_parameters(keys, initial), fraction_evaluate=0.0,
                         on_fit_config_fn=self._fit_config, **sampling)
        self.fedpt, self.cfg, self.system, self.keys, self.settings = fedpt, cfg, system, keys, settings
        self._broadcast: dict[str, torch.Tensor] = {}
        self._sent: list[int] = []  # node ids sampled this round
        self.watch: WatchedGrid | None = None  # set by StrictSecAggPlusWorkflow for the round
        self.last_mean_update: NDArrays | None = None  # what SecAgg+ revealed last round (for tests/inspection)

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {CONFIG_KEY: self.cfg.to_json(), SYSTEM_KEY: self.system,
                "server-round": server_round + self.fedpt.first_round, ADAPTER_KEYS_KEY: "\n".join(self.keys),
                CLIP_KEY: float(self.settings.clipping_range), MAX_WEIGHT_KEY: float(self.settings.max_weight)}

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Step 1, plus the round's record (as ``FedPTStrategy.configure_train`` starts it)."""
        fedpt, rnd = self.fedpt, server_round + self.fedpt.first_round
        self._broadcast = to_state(self.keys, parameters)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._sent = [proxy.node_id for proxy, _ in instructions]
        fedpt.begin_round(rnd, self._sent, state_to_arrays(self._broadcast).count_bytes())
        fedpt.phase(rnd, f"device training + SecAgg+ ({len(instructions)} devices)")
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Steps 3-5: broadcast + SecAgg+'s mean update (= FedAvg), then proxy-tuning + distillation."""
        fedpt, rnd = self.fedpt, server_round + self.fedpt.first_round
        in_sum = {proxy.node_id for proxy, _ in results}
        seen = self.watch.problems if self.watch is not None else {}
        problems = [f"node {node}: {seen.get(node, 'dropped out of SecAgg+')}" for node in self._sent
                    if node not in in_sum]
        fedpt.record_outcome(rnd, len(results), problems, counted="update(s) in the secure sum")
        fits = sorted((fit for _, fit in results), key=lambda f: (f.num_examples, float(f.metrics["train_loss"])))
        with fedpt.server_step(rnd, "aggregation"):
            mean_update = parameters_to_ndarrays(fits[0].parameters)  # identical in every FitRes
            self._check_mean_update(rnd, mean_update)
            state = {k: (b.double() + torch.from_numpy(np.asarray(u, dtype=np.float64))).to(b.dtype)
                     for (k, b), u in zip(self._broadcast.items(), mean_update)}
        self.last_mean_update = mean_update
        clipped = sum(int(f.metrics.get(CLIPPED_KEY, 0)) for f in fits)
        if clipped:  # the mean is then biased toward 0: clipping_range or max_weight is too small
            problems.append(f"{clipped} update entries clipped to +-{self.settings.clipping_range:.3g} "
                            "before quantization")
            log(WARNING, "round %s: SecAgg+: %s", rnd, problems[-1])
        total = sum(f.num_examples for f in fits)
        train_loss = sum(f.num_examples * float(f.metrics["train_loss"]) for f in fits) / total
        fedpt.record.train_loss = train_loss
        # Upload per device: its masked int64 vector (+ masked weight), as serialized; key exchange not counted.
        uploads = [self.watch.upload_bytes[n] for n in in_sum if n in self.watch.upload_bytes] if self.watch else []
        if not uploads:  # not run by StrictSecAggPlusWorkflow: the vector's size
            uploads = [8 * (sum(int(np.prod(u.shape)) for u in mean_update) + 1)] * len(fits)
        fedpt.record_devices([f.metrics for f in fits], uploads)
        arrays = fedpt.after_aggregation(rnd, state_to_arrays(state))
        return to_parameters(self.keys, arrays.to_torch_state_dict()), {"train_loss": train_loss}

    def _check_mean_update(self, rnd: int, mean_update: NDArrays) -> None:
        """The only update the server sees is the mean: shapes, finiteness, and its norm."""
        if len(mean_update) != len(self._broadcast):
            raise FedPTError(f"round {rnd}: SecAgg+ returned {len(mean_update)} arrays, "
                             f"expected {len(self._broadcast)}")
        for (key, b), u in zip(self._broadcast.items(), mean_update):
            if tuple(u.shape) != tuple(b.shape):
                raise FedPTError(f"round {rnd}: mean update of {key} has shape {tuple(u.shape)}, expected "
                                 f"{tuple(b.shape)}")
            if not np.isfinite(u).all():
                raise FedPTError(f"round {rnd}: mean update of {key} holds NaN or Inf")
        norm = math.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in mean_update))
        if self.fedpt.max_update_norm and norm > self.fedpt.max_update_norm:
            raise FedPTError(f"round {rnd}: the mean update's norm {norm:.3g} exceeds federation.max_update_norm="
                             f"{self.fedpt.max_update_norm} (under SecAgg+ it bounds the mean, not each device)")

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """FedPT's server-side evaluation, record, progress and checkpoint (``FedPTStrategy.evaluate``)."""
        metrics = self.fedpt.evaluate(server_round, state_to_arrays(to_state(self.keys, parameters)))
        return (float("nan"), dict(metrics)) if metrics is not None else None  # no loss: Rouge-L only


class StrictSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, but a halted protocol fails the round instead of silently skipping it.

    (Flower logs "Secure aggregation halted" and keeps the old model, so the round's record would be
    written as if it had trained.) It also hands the strategy a ``WatchedGrid``: which node failed
    why, and the bytes of each masked upload.
    """

    def __call__(self, grid: Grid, context: Context) -> None:
        if not isinstance(context, LegacyContext):
            raise TypeError(f"Expect a LegacyContext, but get {type(context).__name__}.")
        watched = WatchedGrid(grid)
        if isinstance(context.strategy, SecAggFedPT):
            context.strategy.watch = watched
        state = WorkflowState()
        for step in (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage):
            if not step(watched, context, state):
                rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
                if isinstance(context.strategy, SecAggFedPT):
                    rnd += context.strategy.fedpt.first_round
                reasons = "; ".join(f"node {n}: {r}" for n, r in watched.problems.items())[:300]
                raise FedPTError(f"round {rnd}: secure aggregation halted at its "
                                 f"{step.__name__.replace('_', ' ')} ({len(state.active_node_ids)} device(s) left, "
                                 f"each needs {state.threshold or '?'} live neighbours)"
                                 + (f": {reasons}" if reasons else ""))


class WatchedGrid(Grid):
    """A Grid that passes everything through and notes, per node, why it dropped out and what it uploaded."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.problems: dict[int, str] = {}  # node -> first reason it left the protocol
        self.upload_bytes: dict[int, int] = {}  # node -> bytes of its masked vector

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.problems.setdefault(node, _error_reason(reply) or "error")
                continue
            masked = reply.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(SecAggKey.MASKED_PARAMETERS)
            if masked is not None:
                self.upload_bytes[node] = sum(len(b) for b in masked)
        replied = {r.metadata.src_node_id for r in replies}
        for message in messages:
            if message.metadata.dst_node_id not in replied:
                self.problems.setdefault(message.metadata.dst_node_id, "no reply within the SecAgg+ stage timeout")
        return replies

    @property
    def run(self) -> Any:
        return self.grid.run

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


def run_secagg_system(grid: Grid, context: Context, fedpt: FedPTStrategy, cfg: FedPTConfig, system: str,
                      initial: dict[str, Any], settings: SecAggSettings, num_rounds: int) -> dict[str, Any]:
    """Run ``num_rounds`` SecAgg+ rounds of one system; returns the final adapter state."""
    fed = cfg.federation
    keys = list(initial)
    strategy = SecAggFedPT(fedpt, cfg, system, keys, initial, settings,
                           fraction_fit=fed.clients_per_round / fed.num_clients, min_fit_clients=fed.clients_per_round,
                           min_available_clients=fed.num_clients)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    workflow = StrictSecAggPlusWorkflow(
        num_shares=settings.num_shares, reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=settings.max_weight, clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range, modulus_range=settings.modulus_range,
        timeout=settings.timeout)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    final = compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    return to_state(keys, final)
