"""A finished run's phases (``<run>/profile.json``) against their hardware bounds: ``fedpt bench --parts job``.

Each phase gets the least time this machine could spend on its work:

- **decoding** (evaluation of a model, the KD teacher): every decoding step reads each weight of
  the models it runs once and computes 2 x params FLOPs per row, so the steps take at least
  ``max(decode_steps x bytes / bandwidth, new_tokens x 2 x params / GEMM FLOP/s)`` (the bytes
  bind narrow batches, the FLOPs wide ones); the prefill is compute:
  ``prompt_tokens x 2 x params / GEMM FLOP/s``, less the prompts llama.cpp restored instead of
  computing (``PromptStates``: ``prompt_flops_restored``). Bytes are what the engine holds: the GGUF file
  for llama.cpp, parameters x dtype size for torch; the proxy reads the large LM and, in
  llama.cpp, the small one twice (tuned and base views are two contexts; torch runs them as one
  doubled batch). Padding rows and finished rows cost nothing here, so the bound is strict.
- **training** (student steps, device steps): ``6 x params x tokens`` FLOPs (forward, backward,
  recomputation under gradient checkpointing; the frozen base needs no weight gradients, so this
  is generous) over the GEMM bound in the training dtype (one thread per device process);
  the pool-KL passes are forwards only: ``2 x params x tokens``.
- **overhead** (Ray start-up, model loading, device wait, aggregation, checkpoints, summary):
  no bound; its seconds are what it costs.

Memory bandwidth is measured in the same process right before (a sum over a 1 GiB tensor with
the run's thread count), the GEMM bound as ``fedpt bench`` measures P3's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fedpt.config import FedPTConfig

OVERHEAD = ("ray start-up", "model loading (server)", "device rounds (wait)", "aggregation", "checkpoint writing",
            "summary writing")


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def memory_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` sums over a ``gib`` GiB float32 tensor."""
    from fedpt.bench import best_seconds

    with _threads(threads):
        data = torch.ones(int(gib * 2**30) // 4)
        data.sum()  # pages touched, threads up
        return data.numel() * 4 / best_seconds(data.sum, repeats)


def training_gemm_bound(cfg: FedPTConfig, threads: int) -> float:
    """FLOP/s of a dense layer of the small LM's width in the training dtype, with ``threads`` threads."""
    from fedpt.bench import gemm_bound
    from fedpt.models.loading import resolve_dtype

    with _threads(threads):
        dtype = getattr(torch, resolve_dtype(cfg.model.dtype))
        return gemm_bound(dtype, rows=cfg.train.batch_size * 256, inner=896, outer=4864, repeats=3)


def _params(spec: str) -> int:
    from fedpt.models.loading import weights_bytes

    return (weights_bytes(spec, "float32") or 0) // 4


def _engine_bytes(cfg: FedPTConfig, spec: str, engine: str) -> int:
    from fedpt.models.loading import gguf_bytes, weights_bytes

    if engine == "llama.cpp":
        return gguf_bytes(spec) or 0
    return weights_bytes(spec, cfg.model.dtype) or 0


def decoding_models(cfg: FedPTConfig, phase: str) -> list[tuple[str, str]]:
    """(model spec, engine) of every weight read per decoding step of ``phase``."""
    from fedpt.server import evaluation_engines

    engines = evaluation_engines(cfg)
    small_engine = engines["small (pretrained and tuned)"]
    large_engine = engines["large (pretrained)"]
    views = "llama.cpp" if cfg.model.small_proxy_backend == "llamacpp" else "torch"
    role = phase.split(": ", 1)[1] if phase.startswith("evaluation: ") else "proxy"
    if role == "small":
        return [(cfg.model.small, small_engine)]
    if role == "large":
        return [(cfg.model.large, large_engine)]
    # the proxy (and the KD teacher): the large LM plus the small LM's tuned and base views
    return [(cfg.model.large, large_engine)] + [(cfg.model.small, views)] * (2 if views == "llama.cpp" else 1)


def phase_table(cfg: FedPTConfig, profile: dict[str, Any], bandwidth: float, gemm: float,
                gemm_one_thread: float) -> list[dict[str, Any]]:
    """One row per phase: seconds, work, the bound's seconds and bound ÷ actual (1.0 = at the bound)."""
    rows = []
    small_params = _params(cfg.model.small)
    for name, values in profile["phases"].items():
        row = {"phase": name, "seconds": values["seconds"], "calls": values["calls"], "kind": "overhead",
               "work": "", "bound_seconds": None}
        if "decode_steps" in values:
            models = decoding_models(cfg, name)
            step_bytes = sum(_engine_bytes(cfg, spec, engine) for spec, engine in models)
            params = sum(_params(spec) for spec, _ in models)
            # a step reads every weight once, and computes 2 x params per row: a wide batch's
            # steps are bound by the FLOPs, a narrow one's by the bytes
            steps = max(values["decode_steps"] * step_bytes / bandwidth, values["new_tokens"] * 2 * params / gemm)
            # prompts whose keys and values llama.cpp restored (PromptStates) were not computed
            prompt_flops = values["prompt_tokens"] * 2 * params
            restored = min(values.get("prompt_flops_restored", 0.0), prompt_flops)
            prefill = (prompt_flops - restored) / gemm
            row.update(kind="decoding", bound_seconds=steps + prefill,
                       work=f"{int(values['new_tokens'])} new tokens in {int(values['decode_steps'])} steps "
                            f"({step_bytes / 2**30:.2f} GiB read per step), {int(values['prompt_tokens'])} "
                            f"prompt tokens" + (f" ({restored / prompt_flops:.0%} of their FLOPs restored, "
                                                "not computed)" if restored else ""))
        elif name == "kd student steps":
            row.update(kind="training", bound_seconds=6 * small_params * values["tokens"] / gemm,
                       work=f"{int(values['steps'])} steps, {int(values['tokens'])} tokens")
        elif name.startswith("kd pool KL"):
            row.update(kind="forward", bound_seconds=2 * small_params * values["tokens"] / gemm,
                       work=f"{int(values['passes'])} passes, {int(values['tokens'])} tokens")
        elif name == "device rounds (wait)":
            row["work"] = device_wait_work(values, profile.get("devices") or {})
        rows.append(row)
    devices = profile.get("devices") or {}
    if devices.get("device_seconds"):
        rows.append({"phase": "device steps (devices' own clocks, summed)", "seconds": devices["device_seconds"],
                     "calls": devices["device_rounds"], "kind": "training",
                     "work": f"{int(devices['tokens'])} tokens in {devices['device_rounds']} device rounds, 1 thread each",
                     "bound_seconds": 6 * small_params * devices["tokens"] / gemm_one_thread})
    for row in rows:
        row["ratio"] = row["bound_seconds"] / row["seconds"] if row["bound_seconds"] and row["seconds"] else None
    return rows


def device_wait_work(wait: dict[str, Any], devices: dict[str, Any]) -> str:
    """What the server's wait for the devices was made of: the busiest device process's own seconds
    (set-up included) are the least it could be; the rest is outside every device's clock
    (message passing, process start-up, a process idle while another finishes)."""
    work = f"{int(wait.get('rounds', 0))} rounds"
    if devices.get("busiest_seconds") is None:
        return work  # a run made before devices reported their set-up time and process
    outside = wait["seconds"] - devices["busiest_seconds"]
    mean = (devices["device_seconds"] + devices["prepare_seconds"]) / devices["processes"]
    return (f"{work}; busiest of {devices['processes']} device processes {devices['busiest_seconds']:.1f} s, "
            f"mean {mean:.1f} s (set-up {devices['prepare_seconds']:.1f} s summed over devices); "
            f"{outside:.1f} s outside the busiest")


def measure(cfg: FedPTConfig, run_dir: Path, threads: int) -> dict[str, Any]:
    """The phase table of the finished run in ``run_dir``, with the bounds measured now."""
    profile = json.loads((run_dir / "profile.json").read_text())
    bandwidth = memory_bandwidth(threads)
    gemm, gemm_one = training_gemm_bound(cfg, threads), training_gemm_bound(cfg, 1)
    rows = phase_table(cfg, profile, bandwidth, gemm, gemm_one)
    return {"bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": gemm / 1e9, "gemm_one_thread_gflop_s": gemm_one / 1e9,
            "wall_seconds": profile["wall_seconds"], "outside_phases_seconds": profile["outside_phases_seconds"],
            "rows": rows, "memory": profile.get("memory")}


def markdown(table: dict[str, Any]) -> list[str]:
    lines = [f"Bounds measured in this run: memory read bandwidth **{table['bandwidth_gb_s']:.1f} GB/s**, "
             f"GEMM **{table['gemm_gflop_s']:.0f} GFLOP/s** ({table['gemm_one_thread_gflop_s']:.0f} on one thread). "
             f"Wall time {table['wall_seconds']:.0f} s, of which {table['outside_phases_seconds']:.0f} s outside "
             "the phases below (data, partitions, Flower's own steps).", "",
             "| phase | kind | seconds | calls | work | bound s | bound ÷ actual |", "|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        bound = f"{row['bound_seconds']:.1f}" if row["bound_seconds"] is not None else ""
        ratio = f"**{row['ratio']:.2f}**" if row["ratio"] is not None else ""
        lines.append(f"| {row['phase']} | {row['kind']} | {row['seconds']:.1f} | {row['calls']} | {row['work']} | "
                     f"{bound} | {ratio} |")
    return lines + memory_markdown(table.get("memory"))


def memory_markdown(memory: dict[str, Any] | None) -> list[str]:
    """Who held the memory at the all-process peak (PSS), and each process's own peak."""
    if not memory or not memory.get("at_peak"):
        return []  # a run made before the breakdown was recorded
    at_peak = memory["at_peak"]
    lines = ["", f"Memory at the all-process peak ({memory['peak_bytes'] / 2**30:.2f} GiB PSS, server in phase "
                 f"`{at_peak.get('phase') or 'none'}`), and each process's own peak:", "",
             "| process | at the peak GiB | own peak GiB |", "|---|---|---|"]
    own = memory.get("per_process_peak_bytes", {})
    for name in dict.fromkeys([*at_peak["processes"], *own]):
        share = at_peak["processes"].get(name)
        lines.append(f"| {name} | {'' if share is None else f'{share / 2**30:.2f}'} | {own.get(name, 0) / 2**30:.2f} |")
    return lines
