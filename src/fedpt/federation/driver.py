"""The ServerApp's body: run each configured system (FedPT and/or baselines) on one Grid, in turn.

Both entry points call ``run_systems``: ``fedpt run`` (``fedpt.federation.simulation``, Flower's
simulation runtime) and ``flwr run .`` (``fedpt.federation.server_app``, a SuperLink in
simulation or deployment mode). Run preparation (preflight, output directory, lock, summary)
is theirs, from ``fedpt.runner``; this module only runs rounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, Strategy

from fedpt import profile
from fedpt.checkpoint import check_same_config, load_checkpoint, save_checkpoint
from fedpt.config import FedPTConfig
from fedpt.federation.records import UNIFORM_WEIGHT_KEY, arrays_to_state, state_to_arrays, train_config
from fedpt.federation.local_dp import local_dp_from_config
from fedpt.federation.strategy import FedPTStrategy, TargetReached
from fedpt.metrics import RoundLog, RoundRecord
from fedpt.predictions import remove_after
from fedpt.progress import Progress
from fedpt.server import ServerModels, load_splits
from fedpt.systems import SYSTEM_SPECS, target_met, training_groups


def run_systems(grid: Grid, cfg: FedPTConfig, out_dir: Path | None, progress: Progress | None = None,
                context: Context | None = None) -> list[RoundRecord]:
    """Run every system of ``cfg.run.systems`` for ``cfg.federation.rounds`` rounds; save adapters.

    Rounds run through Flower's ``Strategy.start``, or, with ``federation.secure_aggregation``,
    through its SecAgg+ workflow (``fedpt.federation.secagg``); the FedPT steps are the same.
    """
    splits = load_splits(cfg)
    server = ServerModels.load(cfg, splits, large_trainable="fedavg-large" in cfg.run.systems, run_dir=out_dir,
                                distils=True)
    round_log = RoundLog(out_dir / "rounds.jsonl" if out_dir else None)
    fed = cfg.federation
    secure = None
    if fed.secure_aggregation:
        from fedpt.federation.secagg import secagg_settings

        # Every simulated partition is a subset of the device split: its size bounds any device's count.
        secure = secagg_settings(cfg, max_weight=fed.secagg_max_weight or len(splits.train))
    for group in training_groups(cfg.run.systems):
        _run_group(grid, cfg, out_dir, progress, context, server, round_log, secure, group)
    return round_log.records


def _run_group(grid: Grid, cfg: FedPTConfig, out_dir: Path | None, progress: Progress | None,
               context: Context | None, server: ServerModels, round_log: RoundLog, secure: Any,
               group: list[str]) -> None:
    """Run the systems of one training group (``fedpt.systems.training_groups``) on shared device rounds.

    Each system resumes from its own checkpoint; a system that finished (every round, or
    ``federation.target_rouge_l`` met) records nothing more. The group restarts after the
    earliest checkpoint of its unfinished systems (one ahead of it, because a stop fell between
    two checkpoint writes, redoes that round).
    """
    fed = cfg.federation
    folders = {name: out_dir / name / "checkpoints" if out_dir else None for name in group}
    checkpoints = {name: load_checkpoint(folder) if folder else None for name, folder in folders.items()}
    for name, checkpoint in checkpoints.items():
        if checkpoint is not None:
            check_same_config(checkpoint, cfg, folders[name])
    done = {name: checkpoint.round if checkpoint else 0 for name, checkpoint in checkpoints.items()}
    active = [name for name in group
              if done[name] < fed.rounds and not target_met(cfg, name, (checkpoints[name].records or [])
                                                             if checkpoints[name] else [])]
    start = min((done[name] for name in active), default=0)
    final = None
    for name in group:
        last = start if name in active else done[name]
        checkpoint = checkpoints[name]
        saved = ([row for row in checkpoint.records if row["round"] <= last]
                 if last > 0 and checkpoint is not None and checkpoint.records is not None else None)
        # The checkpoint's records are the truth: rounds logged (and predicted) after it are redone.
        round_log.restore(name, last, saved)
        if out_dir is not None:
            remove_after(out_dir, name, last)
        if progress is not None and last:
            progress.skip(min(last, fed.rounds))
    if active:
        specs = [SYSTEM_SPECS[name] for name in group]
        sampling = dict(fraction_train=fed.clients_per_round / fed.num_clients,
                        min_train_nodes=fed.clients_per_round, min_available_nodes=fed.num_clients,
                        fraction_evaluate=0.0)  # evaluation is server-side
        checkpointers = {name: _checkpointer(folder, cfg, round_log, name) for name, folder in folders.items()
                         if folder is not None}
        strategy = FedPTStrategy(
            server, specs[0], round_log, num_rounds=fed.rounds, eval_every=cfg.eval.every, progress=progress,
            first_round=start,
            on_round_end=(lambda system, rnd, arrays, state: checkpointers[system](rnd, arrays, state))
            if checkpointers else None,
            aggregator=make_aggregator(cfg, **sampling), max_update_norm=fed.max_update_norm,
            min_results=fed.min_results, sampling_seed=cfg.run.seed, local_dp=local_dp_from_config(cfg),
            shared=tuple(specs[1:]), active=set(active), run_dir=out_dir, target_rouge_l=fed.target_rouge_l,
            **sampling,
        )
        resume_from = next((checkpoints[name] for name in active if done[name] == start and checkpoints[name]), None)
        if resume_from is not None:
            strategy.load_strategy_state(resume_from.state)
        initial = resume_from.adapter if resume_from else server.initial_adapter(specs[0].device_model)
        try:
            if secure is not None:
                from fedpt.federation.secagg import run_secagg_system

                context = context or Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                             run_config={})
                final = run_secagg_system(grid, context, strategy, cfg, group[0], initial, secure, fed.rounds - start)
            else:
                result = strategy.start(
                    grid=grid, initial_arrays=state_to_arrays(initial), num_rounds=fed.rounds - start,
                    timeout=fed.round_timeout, train_config=train_config(cfg, group[0]),
                    evaluate_fn=strategy.evaluate)
                final = arrays_to_state(result.arrays)
        except TargetReached as stop:
            final = arrays_to_state(stop.arrays)
    if out_dir is not None:  # the final adapter in peft's format (also rewritten when resuming)
        for name in group:
            # A system that stopped at its target ends with its own last checkpoint, not the group's.
            checkpoint = load_checkpoint(folders[name])
            adapter = checkpoint.adapter if checkpoint is not None else final
            server.load_adapter(SYSTEM_SPECS[name].device_model, adapter)
            server.model(SYSTEM_SPECS[name].device_model).save_pretrained(out_dir / name / "adapter")


def make_aggregator(cfg: FedPTConfig, **sampling: Any) -> Strategy | None:
    """Flower's robust or central-DP aggregation from the config (None: plain FedAvg, the strategy's own).

    ``sampling`` (fractions, minimum nodes) goes to the aggregator, which also samples the devices.
    """
    fed, privacy = cfg.federation, cfg.privacy
    if privacy.dp == "central":
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        # Client-level DP over a fixed population, no credit taken for sampling.
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=privacy.delta, population_size=fed.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=privacy.max_epsilon or None))
        return DifferentialPrivacyServerSideFixedClipping(
            FedAvg(weighted_by_key=UNIFORM_WEIGHT_KEY, **sampling), noise_multiplier=privacy.noise_multiplier,
            clipping_norm=privacy.clipping_norm, num_sampled_clients=fed.clients_per_round, accountant=accountant)
    if fed.aggregation == "median":
        return FedMedian(**sampling)
    if fed.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=fed.trim_beta, **sampling)
    if fed.aggregation == "krum":
        return Krum(num_malicious_nodes=fed.krum_malicious, **sampling)
    return None


def _checkpointer(folder: Path, cfg: FedPTConfig, round_log: RoundLog, system: str):
    """Save the global adapter, records and strategy state after every round (``on_round_end``)."""
    def save(server_round: int, arrays: ArrayRecord, state: dict[str, Any]) -> None:
        with profile.phase("checkpoint writing"):
            records = [json.loads(r.to_json()) for r in round_log.records if r.system == system]
            save_checkpoint(folder, server_round, arrays_to_state(arrays), cfg.to_dict(), records, state)
    return save
