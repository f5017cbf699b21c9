"""``fedpt run`` on one machine: Flower's simulation runtime, one Ray actor per busy device."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from fedpt import profile, stopping
from fedpt.config import FedPTConfig
from fedpt.errors import FedPTError
from fedpt.federation.core_share import ENV, CoreShare, remove_stale_folders
from fedpt.metrics import RoundRecord
from fedpt.progress import Progress


def simulate(cfg: FedPTConfig, out_dir: Path | None, progress: Progress | None = None,
             verbose: bool = False) -> list[RoundRecord]:
    """Run all configured systems in one simulation (one Ray start; warm device processes)."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedpt.federation.actor_pool import replace_dead_actors
    from fedpt.federation.client_app import app as client_app
    from fedpt.federation.driver import run_systems

    records: list[RoundRecord] = []
    failure: list[BaseException] = []  # the ServerApp runs in a thread: keep its error for the user
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        try:
            records.extend(run_systems(grid, cfg, out_dir, progress, context))
        except BaseException as err:
            failure.append(err)
            raise

    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)  # the server's steps (proxy, distillation, evaluation)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    backend_config = {
        # Ray gives each actor OMP_NUM_THREADS=1: N concurrent devices on N cores, never oversubscribed.
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                      "logging_level": "ERROR" if not verbose else "INFO", "log_to_driver": verbose},
    }
    # Flower 1.42 marks `run_simulation` deprecated and recommends `flwr run` (a SuperLink in
    # simulation mode, which runs the ServerApp in a `flwr-simulation` process and streams its
    # logs back). `fedpt run` stays on `run_simulation` on purpose: with `flwr run` the ServerApp
    # runs in another process, so the live progress display (fed by the strategy, in this
    # process), the records returned for the table, the ServerApp's FedPTError with its one-line
    # reason, and the peak memory of this process tree would all have to come back through log
    # lines; `fedpt run` would also start, and have to stop, a SuperLink with its detached
    # SuperExec on a port of this machine. `flwr run .` is supported as the other way in
    # (`fedpt.federation.server_app`): same preparation, same rounds.
    with profile.phase("ray start-up"):
        _start_ray(backend_config["init_args"])
    replace_dead_actors()  # a device process killed (e.g. for memory) must not silently cost every later round
    try:  # Flower re-raises the ServerApp's error here, or only logs it: catch both ways
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                       backend_config=backend_config, verbose_logging=verbose)
    except Exception as err:
        failure.append(err)
    finally:
        # Flower leaves its own SIGTERM/SIGINT handlers behind (a stopped experiment died silently
        # in its alpha sweep): whatever the command does next stops cleanly again.
        stopping.install(keep_message=True)
    resume = f"; the last checkpoint is intact: fedpt run --resume {out_dir}" if out_dir else ""
    if failure:
        err = failure[0]
        if isinstance(err, FedPTError) and not str(err).startswith("round "):
            raise err  # bad input found by the server (e.g. a changed config): nothing to resume
        reason = str(err) if isinstance(err, FedPTError) else f"{type(err).__name__}: {err}"
        raise FedPTError(f"{reason}{resume}") from err
    from fedpt.systems import system_finished

    if not all(system_finished(cfg, name, records) for name in cfg.run.systems):
        raise FedPTError(f"the simulation ended before all rounds finished (rerun with --verbose to see why){resume}")
    return records


def _start_ray(init_args: dict) -> None:
    """Start Ray here, as Flower's Ray backend would, then take SIGTERM/SIGINT back from it.

    ``ray.init`` replaces the process's SIGTERM handler (``sys.exit``, which the simulation loop
    swallows: a stopped run went on to its next rounds) and Ray's C++ core installs a failure
    handler that dumps a stack. Flower only calls ``ray.init`` when Ray is not running yet, so
    starting it first (same arguments, same PYTHONPATH for the workers as Flower's
    ``RayBackend.init_ray``) lets ``fedpt.stopping`` handle the signals.
    """
    import sys

    import ray

    if not ray.is_initialized():
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
        env_vars = {"PYTHONPATH": pythonpath, ENV: _core_share(init_args["num_cpus"]).encode()}
        ray.init(runtime_env={"env_vars": env_vars}, **init_args)
    stopping.install(keep_message=True)


@lru_cache(maxsize=1)
def _core_share(cores: int) -> CoreShare:
    """The device processes' lock folder (``fedpt.federation.core_share``): one per server process,
    as Ray starts once per process; removed when the process exits."""
    remove_stale_folders(Path(tempfile.gettempdir()))
    folder = Path(tempfile.mkdtemp(prefix=f"fedpt-cores-{os.getpid()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return CoreShare(folder, cores)
