"""``fedpt bench``'s cost parts, P4-P8: what a device, the simulation and the default job cost.

- **P4** (``memory``) device memory for local training, FedPT ÷ FedAvg-large: one device's LoRA
  step on the small LM against the same step on the large LM, each in a **fresh process** (one
  torch thread, as a Ray device actor), measured as peak RSS minus RSS before the model loads;
- **P5** (``memory``) bytes per device per round, FedPT ÷ FedAvg-large: the adapter a device
  receives plus the one it sends back, counted as Flower's ``ArrayRecord`` carries them;
- **P6** (``clients``) simulation peak memory (PSS summed over every process, Ray actors
  included), 100 simulated clients ÷ 4, the same work per sampled client: two minimal
  ``fedpt run`` processes (1 round, 4 clients sampled, 1 step each, tiny evaluation);
- **P7, P8** (``job``) the default job itself: ``fedpt run`` on the bench's config in a fresh
  process, its wall time and peak memory of all processes (``summary.json``), and the largest
  device process (``rounds.jsonl``). A finished job in ``RUNS/job/`` is read, not rerun (it takes
  tens of minutes on a 2-core CPU); delete that folder to measure again.

The runs go under ``RUNS`` (``--runs``, default ``runs/bench``), beside the user's other runs.

Each part runs in fresh processes so that what one measures cannot inherit the others' memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedpt.config import FedPTConfig
from fedpt.errors import FedPTError

CLIENT_COUNTS = (4, 100)  # P6: simulated clients, 4 of them sampled in either case

# P6's runs do the same minimal work per sampled client whatever the model: what is measured is
# whether memory grows with the number of clients the simulation knows about, not with the work.
MINIMAL_RUN = ["federation.rounds=1", "federation.clients_per_round=4", "train.steps=1", "distill.steps=1",
               "distill.max_new_tokens=4", "data.kd_pool_size=4", "data.eval_size=2", "data.eval_sets_size=2",
               "eval.max_new_tokens=4", "eval.every=1", "run.systems=[\"fedpt\"]"]


def _python(code: str, *args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (this one, this environment); its stdout is returned."""
    import os

    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FedPTError(f"a benchmark subprocess failed ({tail[:300]})")
    return done


def device_training_memory(config_file: Path, role: str) -> dict[str, Any]:
    """One device's LoRA training on the ``role`` ("small" or "large") model in a fresh process."""
    code = "import sys, json; from fedpt.bench_costs import _device_child; print(json.dumps(_device_child(*sys.argv[1:])))"
    return json.loads(_python(code, str(config_file), role, threads=1).stdout.strip().splitlines()[-1])


def _device_child(config_file: str, role: str) -> dict[str, Any]:
    """In the fresh process: what a Ray device actor does for its first round (load, attach, tune),
    through the device's own ``device_model`` and ``local_tune``."""
    import resource
    import time

    import psutil
    import torch

    from fedpt.config import load_config
    from fedpt.data.records import load_examples
    from fedpt.federation.device import device_model
    from fedpt.federation.records import state_to_arrays
    from fedpt.models.loading import resolve_dtype
    from fedpt.models.lora import get_adapter_state
    from fedpt.train import local_tune

    torch.set_num_threads(1)  # as a Ray device actor
    cfg = load_config(path=config_file)
    spec = cfg.model.small if role == "small" else cfg.model.large
    # Longest responses first: every row fills max_seq_len, the worst case a device meets.
    examples = sorted(load_examples(cfg.data.source, cfg.data.fields), key=lambda e: -len(e.response))
    examples = examples[: cfg.train.batch_size]
    before = psutil.Process().memory_info().rss
    model, tokenizer = device_model(spec, cfg.model.dtype, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout,
                                    tuple(cfg.lora.targets))  # what a device loads
    loaded = psutil.Process().memory_info().rss
    # What the device receives and sends back each round: its adapter, as Flower's ArrayRecord
    # carries it (fp32 numpy arrays).
    adapter_bytes = state_to_arrays(get_adapter_state(model)).count_bytes()
    start = time.perf_counter()
    result = local_tune(model, tokenizer, examples, cfg.data, cfg.train, seed=0)
    # The kernel's high-water mark; Linux batches its RSS counters per thread, so a current
    # reading can run a few hundred KB ahead of it: the larger of the two is the peak.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, loaded, psutil.Process().memory_info().rss)
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    return {"model": spec, "dtype": resolve_dtype(cfg.model.dtype), "frozen_weights": str(frozen.dtype).removeprefix("torch."),
            "steps": result.steps,
            "tokens": result.tokens, "seconds": time.perf_counter() - start, "rss_before_load": before,
            "rss_after_load": loaded, "peak_rss": peak, "training_memory": peak - before,
            "adapter_bytes": adapter_bytes}


def memory_and_bytes(cfg: FedPTConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """P4 and P5."""
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.toml"
        cfg.save(config_file)
        devices = {}
        for system, role in (("fedpt", "small"), ("fedavg-large", "large")):
            devices[system] = device_training_memory(config_file, role)
            d = devices[system]
            log(f"P4: {system} device ({d['model']}, {d['steps']} step(s), {d['tokens']} tokens): "
                f"training memory {d['training_memory'] / 2**30:.2f} GiB, peak RSS {d['peak_rss'] / 2**30:.2f} GiB")
    sent = {system: 2 * d["adapter_bytes"] for system, d in devices.items()}  # received + sent back
    log(f"P5: bytes per device per round: fedpt {sent['fedpt'] / 2**20:.2f} MiB, "
        f"fedavg-large {sent['fedavg-large'] / 2**20:.2f} MiB")
    return {"devices": devices, "bytes_per_device_per_round": sent,
            "P4_device_memory_fedpt_over_fedavg_large":
                devices["fedpt"]["training_memory"] / devices["fedavg-large"]["training_memory"],
            "P5_bytes_fedpt_over_fedavg_large": sent["fedpt"] / sent["fedavg-large"]}


def run_job(cfg: FedPTConfig, out_dir: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """``fedpt run`` of ``cfg`` (with ``overrides``) in a fresh process; returns its summary, its
    round records and whether a finished run was read back.

    A folder that already holds a finished run (``summary.json``) of the same config is read, not
    rerun; one of another config is refused, never mistaken for this one's measurement.
    """
    from fedpt.config import load_config

    reused = (out_dir / "summary.json").is_file()
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.toml"
        cfg.save(config_file)
        if overrides:
            load_config(path=config_file, overrides=overrides).save(config_file)
        if reused:
            if load_config(path=out_dir / "config.toml").to_dict() != load_config(path=config_file).to_dict():
                raise FedPTError(f"{out_dir} holds a finished run of another config: delete it or give another --runs")
        else:
            code = "import sys; from fedpt.cli import main; sys.exit(main(sys.argv[1:]))"
            _python(code, "run", "--config", str(config_file), "--out", str(out_dir), "--overwrite", "--no-progress")
    summary = json.loads((out_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": summary, "rounds": rounds, "reused": reused}


def _device_peak(rounds: list[dict[str, Any]]) -> int:
    return max((r.get("device_peak_memory_bytes") or 0 for r in rounds), default=0)


def _devices_trained(rounds: list[dict[str, Any]]) -> list[int]:
    return [r.get("clients") for r in rounds if r.get("round", 0) > 0]


def clients_memory(cfg: FedPTConfig, runs_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """P6: two minimal runs that differ only in how many clients the simulation holds."""
    runs = {}
    for clients in CLIENT_COUNTS:
        folder = runs_dir / f"clients-{clients}"
        job = run_job(cfg, folder, [*MINIMAL_RUN, f"federation.num_clients={clients}"])
        peak = job["summary"]["peak_memory_bytes"]
        runs[clients] = {"out": str(folder), "peak_memory_bytes": peak, "wall_seconds": job["summary"]["wall_seconds"],
                         "device_peak_memory_bytes": _device_peak(job["rounds"]),
                         "devices_trained": _devices_trained(job["rounds"])}
        log(f"P6: {clients} simulated clients: peak {peak / 2**30:.2f} GiB (all processes)")
    few, many = CLIENT_COUNTS
    return {"runs": {str(k): v for k, v in runs.items()},
            "P6_peak_memory_many_over_few": runs[many]["peak_memory_bytes"] / runs[few]["peak_memory_bytes"]}


def default_job(cfg: FedPTConfig, runs_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """P7 and P8: the job ``fedpt run`` does with this config, measured whole."""
    folder = runs_dir / "job"
    job = run_job(cfg, folder)
    summary, reused = job["summary"], job["reused"]
    result = {"out": str(folder), "reused_finished_run": reused,
              "P7_wall_seconds": summary["wall_seconds"], "P8_peak_memory_bytes": summary["peak_memory_bytes"],
              "P8_device_process_peak_bytes": _device_peak(job["rounds"]),
              "devices_trained_per_round": _devices_trained(job["rounds"]),
              "rouge_l": {name: (info["final"] or {}).get("rougeL_sets")
                          for name, info in summary["systems"].items()}}
    log(f"P7: {result['P7_wall_seconds'] / 60:.1f} min; P8: {result['P8_peak_memory_bytes'] / 2**30:.2f} GiB all "
        f"processes, device process {result['P8_device_process_peak_bytes'] / 2**30:.2f} GiB"
        + (" (read from a finished run)" if reused else ""))
    if (folder / "profile.json").is_file():  # runs of older versions have none
        from fedpt import bench_phases

        result["phases"] = bench_phases.measure(cfg, folder, threads=torch.get_num_threads())
        for line in bench_phases.markdown(result["phases"]):
            log(line)
    return result
