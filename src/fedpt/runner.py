"""A run from the user's side: check everything, prepare the output directory, simulate, report.

Everything that can be checked before the first round is checked before the output directory
is touched, so bad input never costs an earlier run its results.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from fedpt.config import FedPTConfig
from fedpt.errors import FedPTError
from fedpt.metrics import PeakMemory, RoundRecord
from fedpt.systems import SYSTEM_SPECS


def preflight(cfg: FedPTConfig) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Data, partitions and vocabularies, checked up front.

    Returns the per-client category histogram and the size of each evaluation set.
    """
    from fedpt.data.partition import category_histogram, partition_examples
    from fedpt.models.loading import check_same_vocabulary
    from fedpt.server import load_eval_sets, load_splits

    splits = load_splits(cfg)
    eval_sets = load_eval_sets(cfg, splits)  # readable, and disjoint from device data and the KD pool
    n = cfg.federation.num_clients
    partitions = [partition_examples(splits.train, n, i, cfg.data, cfg.data.split_seed) for i in range(n)]
    if cfg.model.large_backend == "local":
        check_same_vocabulary(cfg.model.small, cfg.model.large)
    elif cfg.model.large_backend == "remote":  # black box: its tokenizer is not here, its vocabulary hash is
        from fedpt.models.remote import check_remote_vocabulary

        check_remote_vocabulary(cfg.model.large_url, cfg.model.large_api_key_file, cfg.model.small)
    else:  # openai: only the completions API; the server must tokenize probe texts as we do
        from fedpt.models.openai_topk import check_openai_vocabulary

        check_openai_vocabulary(cfg)
    check_memory(cfg)
    return category_histogram(partitions), {name: len(examples) for name, examples in eval_sets.items()}


def check_memory(cfg: FedPTConfig) -> None:
    """Refuse a run whose model weights alone exceed the memory available now (when their size is known).

    The server holds both models; each device training at the same time holds its own copy of
    the model it tunes. Activations come on top, so passing this check is necessary, not sufficient.
    """
    import os

    import psutil

    from fedpt.models.loading import weights_bytes

    small = weights_bytes(cfg.model.small, cfg.model.dtype)
    # a non-local large LM's weights live with its service, not here
    large = weights_bytes(cfg.model.large, cfg.model.dtype) if cfg.model.large_backend == "local" else 0
    if small is None or large is None:
        return
    fed = cfg.federation
    device = large if "fedavg-large" in cfg.run.systems else small
    concurrent = min(fed.clients_per_round, max(1, int((os.cpu_count() or 1) // fed.client_cpus)))
    need = small + large + concurrent * device
    available = psutil.virtual_memory().available
    if need > available:
        gib = 2**30
        raise FedPTError(f"the model weights alone need {need / gib:.1f} GiB in {cfg.model.dtype} (server: "
                         f"{(small + large) / gib:.1f}, {concurrent} device(s) at once: {concurrent * device / gib:.1f}) "
                         f"but {available / gib:.1f} GiB is available: use smaller models, model.dtype='bfloat16', "
                         "or fewer devices at once (a larger federation.client_cpus)")


def check_resumable(cfg: FedPTConfig, out_dir: Path) -> None:
    """Every checkpoint must load (hash checked) and come from this config (rounds may grow)."""
    from fedpt.federation.server_app import check_same_config
    from fedpt.checkpoint import load_checkpoint

    for name in cfg.run.systems:
        folder = out_dir / name / "checkpoints"
        checkpoint = load_checkpoint(folder)
        if checkpoint is not None:
            check_same_config(checkpoint, cfg, folder)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty run directory is only replaced when the user says ``--overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FedPTError(f"output path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FedPTError(f"output directory {out_dir} already holds a run; pass --overwrite to replace it "
                             "or choose another --out")
        if not (out_dir / "config.toml").is_file():  # --overwrite deletes fedpt runs, nothing else
            raise FedPTError(f"{out_dir} is not empty and is not a fedpt run (no config.toml); "
                             "--overwrite will not delete it: choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def run(cfg: FedPTConfig, out_dir: Path, overwrite: bool = False, verbose: bool = False,
        show_progress: bool = True, resume: bool = False) -> dict:
    """``fedpt run``: all configured systems in one Flower simulation; returns the summary.

    With ``resume``, ``out_dir`` is an earlier run: each system continues after its last
    checkpointed round (finished systems are skipped).
    """
    from fedpt.federation.simulation import simulate
    from fedpt.progress import Progress

    if cfg.faults.exit:
        raise FedPTError("faults.exit kills a Ray worker that hosts several simulated devices, and Flower's "
                         "simulation does not restart it; use faults.crash here (exit is for real SuperNodes)")
    histogram, eval_sizes = preflight(cfg)
    if resume:
        check_resumable(cfg, out_dir)
    else:
        prepare_out_dir(out_dir, overwrite)
        cfg.save(out_dir / "config.toml")
        write_partition_report(out_dir, histogram)
    progress = Progress(cfg.run.systems, cfg.federation.rounds, enabled=show_progress)
    start = time.perf_counter()
    try:
        with PeakMemory() as memory:
            records = simulate(cfg, out_dir, progress, verbose)
    finally:
        progress.close()
    return write_summary(out_dir, cfg, records, eval_sizes, time.perf_counter() - start, memory.peak_bytes)


def write_partition_report(out_dir: Path, histogram: dict[str, list[int]]) -> None:
    """Per-client category histogram of the device data: JSON, a Markdown table and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "partitions.json").write_text(json.dumps(histogram, indent=1))
    clients = len(next(iter(histogram.values()), []))
    lines = ["| category | " + " | ".join(f"client {i}" for i in range(clients)) + " |",
             "|---|" + "---|" * clients]
    lines += [f"| {c} | " + " | ".join(str(n) for n in counts) + " |" for c, counts in histogram.items()]
    lines.append("| **total** | " + " | ".join(str(sum(col)) for col in zip(*histogram.values())) + " |")
    (out_dir / "partitions.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(max(4, clients * 0.8 + 2), 4))
    bottom = [0] * clients
    for category, counts in histogram.items():
        ax.bar(range(clients), counts, bottom=bottom, label=category)
        bottom = [b + n for b, n in zip(bottom, counts)]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_xticks(range(clients))
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "partitions.png", dpi=110)
    plt.close(fig)


def write_summary(out_dir: Path, cfg: FedPTConfig, records: list[RoundRecord], eval_sizes: dict[str, int],
                  wall_seconds: float | None, peak_memory_bytes: int | None) -> dict:
    from fedpt.evaluate import protocol_name

    systems = {}
    for name in cfg.run.systems:
        rows = [r for r in records if r.system == name]
        final = max(rows, key=lambda r: r.round) if rows else None
        pretrained = next((r for r in rows if r.round == 0), None)
        systems[name] = {
            "description": SYSTEM_SPECS[name].summary,
            "final": final.__dict__ if final else None,
            "pretrained": pretrained.__dict__ if pretrained else None,
            "adapter": str(out_dir / name / "adapter"),
        }
    summary = {
        "systems": systems,
        "rounds": cfg.federation.rounds,
        "eval_protocol": protocol_name(cfg.eval),
        "prompt_template": cfg.data.template,
        "eval_sets": eval_sizes,
        "privacy": _privacy_summary(cfg, systems),
        "wall_seconds": wall_seconds,
        "peak_memory_bytes": peak_memory_bytes,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _privacy_summary(cfg: FedPTConfig, systems: dict) -> dict:
    """The DP settings and, per system, the epsilon spent by its last round (RDP accountant)."""
    privacy = cfg.privacy
    if privacy.dp == "off":
        return {"dp": "off"}
    final = {name: info["final"] or {} for name, info in systems.items()}
    settings = ({"noise_multiplier": privacy.noise_multiplier} if privacy.dp == "central"
                else {"local_epsilon": privacy.local_epsilon})
    return {"dp": privacy.dp, **settings, "clipping_norm": privacy.clipping_norm,
            "delta": {name: row.get("dp_delta") for name, row in final.items()},
            "epsilon": {name: row.get("dp_epsilon") for name, row in final.items()}}


def format_table(summary: dict) -> str:
    """Rouge-L per system and evaluation set: pretrained (round 0) and after the last round."""
    def cell(value: float | None) -> str:
        return f"{value:>10.2f}" if value is not None else f"{'-':>10}"

    header = f"{'system':<14}{'eval set':<16}{'small@0':>10}{'large@0':>10}{'small':>10}{'proxy':>10}{'large':>10}"
    lines = [f"Rouge-L ({summary['eval_protocol']}); @0 = pretrained, others after round {summary['rounds']}",
             header, "-" * len(header)]
    for name, info in summary["systems"].items():
        first, last = info["pretrained"] or {}, info["final"] or {}
        for set_name in (last.get("rougeL_sets") or first.get("rougeL_sets") or {}):
            before = first.get("rougeL_sets", {}).get(set_name, {})
            after = last.get("rougeL_sets", {}).get(set_name, {})
            lines.append(f"{name:<14}{set_name:<16}{cell(before.get('small'))}{cell(before.get('large'))}"
                         f"{cell(after.get('small'))}{cell(after.get('proxy'))}{cell(after.get('large'))}")
    lines.append("small = tuned small LM; proxy = large LM proxy-tuned by it; large = large LM tuned directly")
    privacy = summary.get("privacy", {})
    if privacy.get("dp", "off") != "off":
        spent = ", ".join(f"{name} {e:.2f} at delta {privacy['delta'][name]:g}" if e is not None else f"{name} -"
                          for name, e in privacy["epsilon"].items())
        knob = (f"noise {privacy['noise_multiplier']}" if privacy["dp"] == "central"
                else f"epsilon {privacy['local_epsilon']} per round")
        lines.append(f"{privacy['dp']} DP ({knob}, clip {privacy['clipping_norm']}): epsilon {spent}")
    return "\n".join(lines)
