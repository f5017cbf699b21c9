"""The ServerApp for ``flwr run .``: a SuperLink runs it, in simulation or deployment mode.

Configured from ``[tool.flwr.app.config]`` in ``pyproject.toml`` or ``flwr run --run-config``:

- ``preset`` / ``config-file``: the run config (a file wins over a preset);
- ``set``: config overrides separated by ``;``, e.g. ``"federation.num_clients=2; train.steps=2"``;
- ``systems``: comma-separated systems (default: the config's ``run.systems``);
- ``out``: the run directory, on the SuperLink's host (make it absolute: a relative path is taken
  from the SuperLink's working directory); ``overwrite``: replace an earlier run there;
- ``node-timeout``: seconds to wait for ``federation.num_clients`` SuperNodes to connect.

It prepares the run exactly as ``fedpt run`` does (``fedpt.runner.prepared_run``: preflight,
the run directory's lock, output directory; ``write_summary`` at the end) and runs the same
rounds (``fedpt.federation.driver.run_systems``).
"""

from __future__ import annotations

import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedpt.config import FedPTConfig, load_config
from fedpt.errors import FedPTError
from fedpt.federation.driver import run_systems
from fedpt.progress import Progress
from fedpt.runner import prepared_run, write_summary

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .`` (simulation or deployment)."""
    try:
        cfg, out_dir, overwrite, node_timeout = config_from_run_config(context.run_config)
        with prepared_run(cfg, out_dir, overwrite=overwrite) as eval_sizes:
            wait_for_nodes(grid, cfg.federation.num_clients, node_timeout)
            start = time.perf_counter()
            records = run_systems(grid, cfg, out_dir, Progress(cfg.run.systems, cfg.federation.rounds), context)
            write_summary(out_dir, cfg, records, eval_sizes, wall_seconds=time.perf_counter() - start,
                          peak_memory_bytes=None)
        log(INFO, "fedpt: results in %s (rounds.jsonl, summary.json, <system>/adapter)", out_dir)
    except FedPTError as err:
        log(ERROR, "error: %s", err)  # the one line the user needs, ahead of Flower's traceback
        raise


def config_from_run_config(run_config: dict) -> tuple[FedPTConfig, Path, bool, float]:
    """The run config, output directory, overwrite flag and node timeout from Flower's run config."""
    path = str(run_config.get("config-file", "")) or None
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(path=path, preset=None if path else str(run_config.get("preset", "tiny")), overrides=overrides)
    systems = [s.strip() for s in str(run_config.get("systems", "")).split(",") if s.strip()]
    if systems:
        cfg.run.systems = systems
        cfg.validate()
    out_dir = Path(str(run_config.get("out", "runs/flwr"))).expanduser().resolve()
    return cfg, out_dir, bool(run_config.get("overwrite", False)), float(run_config.get("node-timeout", 120))


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Wait until ``expected`` SuperNodes are connected; a different number is an error, not a hang.

    Without this, Flower's sampling waits forever for a node that was never started (e.g. the
    local simulation's 2 SuperNodes against a config with 3 devices). Too many nodes is waited
    out too: a SuperNode that just stopped stays listed until its heartbeats lapse (about 60 s in
    Flower 1.42), and sampling it would cost a round a device.
    """
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) != expected and time.monotonic() < deadline:
        time.sleep(poll)
        nodes = list(grid.get_node_ids())
    if len(nodes) != expected:
        raise FedPTError(
            f"the federation has {len(nodes)} connected SuperNode(s) after {timeout:.0f} s, but "
            f"federation.num_clients = {expected}: start {expected} SuperNodes (local simulation: flwr run . "
            f"--federation-config num-supernodes={expected}) or run with --run-config "
            f"'set=\"federation.num_clients={len(nodes)}\"'")
    return nodes
