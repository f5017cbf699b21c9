"""The ServerApp: run each configured system (FedPT and/or baselines) on one Grid, in turn.

``fedpt run`` builds a ServerApp around ``run_systems`` (``fedpt.federation.simulation``);
``flwr run .`` uses ``app`` below, configured from ``[tool.flwr.app.config]``:
``preset``, ``config-file``, ``systems`` (comma-separated), ``out``, ``overwrite``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, Strategy

from fedpt.checkpoint import load_checkpoint, save_checkpoint
from fedpt.config import FedPTConfig, load_config
from fedpt.federation.records import arrays_to_state, state_to_arrays, train_config
from fedpt.federation.strategy import FedPTStrategy
from fedpt.metrics import RoundLog, RoundRecord
from fedpt.progress import Progress
from fedpt.server import ServerModels, load_eval_sets, load_splits
from fedpt.systems import SYSTEM_SPECS


def run_systems(grid: Grid, cfg: FedPTConfig, out_dir: Path | None,
                progress: Progress | None = None) -> list[RoundRecord]:
    """Run every system of ``cfg.run.systems`` for ``cfg.federation.rounds`` rounds; save adapters."""
    server = ServerModels.load(cfg, load_splits(cfg), large_trainable="fedavg-large" in cfg.run.systems)
    round_log = RoundLog(out_dir / "rounds.jsonl" if out_dir else None)
    fed = cfg.federation
    for name in cfg.run.systems:
        spec = SYSTEM_SPECS[name]
        folder = out_dir / name / "checkpoints" if out_dir else None
        checkpoint = load_checkpoint(folder) if folder else None
        done = checkpoint.round if checkpoint else 0
        round_log.truncate(name, done)
        if progress is not None and done:
            progress.skip(min(done, fed.rounds))
        if done >= fed.rounds:  # finished in an earlier run
            final = checkpoint.adapter
        else:
            strategy = FedPTStrategy(
                server, spec, round_log, num_rounds=fed.rounds, eval_every=cfg.eval.every, progress=progress,
                first_round=done, on_round_end=_checkpointer(folder) if folder else None,
                aggregator=make_aggregator(cfg), max_update_norm=fed.max_update_norm, min_results=fed.min_results,
                fraction_train=fed.clients_per_round / fed.num_clients, min_train_nodes=fed.clients_per_round,
                min_available_nodes=fed.num_clients, fraction_evaluate=0.0,  # evaluation is server-side
            )
            initial = checkpoint.adapter if checkpoint else server.initial_adapter(spec.device_model)
            result = strategy.start(
                grid=grid, initial_arrays=state_to_arrays(initial), num_rounds=fed.rounds - done,
                timeout=fed.round_timeout, train_config=train_config(cfg, name), evaluate_fn=strategy.evaluate,
            )
            final = arrays_to_state(result.arrays)
        if out_dir is not None:  # the final adapter in peft's format (also rewritten when resuming)
            server.load_adapter(spec.device_model, final)
            server.model(spec.device_model).save_pretrained(out_dir / name / "adapter")
    return round_log.records


def make_aggregator(cfg: FedPTConfig) -> Strategy | None:
    """Flower's robust aggregation by name (None: plain FedAvg, the strategy's own)."""
    fed = cfg.federation
    if fed.aggregation == "median":
        return FedMedian()
    if fed.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=fed.trim_beta)
    if fed.aggregation == "krum":
        return Krum(num_malicious_nodes=fed.krum_malicious)
    return None


def _checkpointer(folder: Path):
    """Save the global adapter after every round (``FedPTStrategy.on_round_end``)."""
    def save(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(folder, server_round, arrays_to_state(arrays))
    return save


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .`` (simulation or deployment)."""
    run_config = context.run_config
    path = str(run_config.get("config-file", "")) or None
    cfg = load_config(path=path, preset=None if path else str(run_config.get("preset", "tiny")))
    systems = [s.strip() for s in str(run_config.get("systems", "")).split(",") if s.strip()]
    if systems:
        cfg.run.systems = systems
        cfg.validate()
    out_dir = Path(str(run_config.get("out", "runs/flwr"))).resolve()
    from fedpt.runner import prepare_out_dir, write_summary

    prepare_out_dir(out_dir, overwrite=bool(run_config.get("overwrite", False)))
    cfg.save(out_dir / "config.toml")
    records = run_systems(grid, cfg, out_dir, Progress(cfg.run.systems, cfg.federation.rounds))
    eval_sizes = {name: len(examples) for name, examples in load_eval_sets(cfg, load_splits(cfg)).items()}
    write_summary(out_dir, cfg, records, eval_sizes, wall_seconds=None, peak_memory_bytes=None)
