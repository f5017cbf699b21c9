"""A run from the user's side: check everything, prepare the output directory, run, report.

One way in for both entry points: ``fedpt run`` (``run`` below, Flower's simulation runtime)
and ``flwr run .`` (``fedpt.federation.server_app``) prepare a run with ``prepared_run``
(preflight, the run directory's lock, the output directory) and end it with ``write_summary``.
Everything that can be checked before the first round is checked before the output directory
is touched, so bad input never costs an earlier run its results.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpt.config import FedPTConfig
from fedpt.errors import FedPTError
from fedpt.metrics import PeakMemory, RoundRecord
from fedpt.models.loading import resolve_dtype
from fedpt.runlock import LOCK_NAME, run_lock
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
    if cfg.model.large_backend in ("local", "llamacpp"):
        check_same_vocabulary(cfg.model.small, cfg.model.large)
        check_llamacpp_runs_here(cfg)
    elif cfg.model.large_backend == "remote":  # black box: its tokenizer is not here, its vocabulary hash is
        from fedpt.models.remote import check_remote_vocabulary

        check_remote_vocabulary(cfg.model.large_url, cfg.model.large_api_key_file, cfg.model.small)
    else:  # openai: only the completions API; the server must tokenize probe texts as we do
        from fedpt.models.openai_topk import check_openai_vocabulary

        check_openai_vocabulary(cfg)
    check_memory(cfg)
    return category_histogram(partitions), {name: len(examples) for name, examples in eval_sets.items()}


def check_llamacpp_runs_here(cfg: FedPTConfig) -> None:
    """The GGUF files llama.cpp will run, decoded once in a child process (``check_runs_here``).

    Where llama.cpp crashes on this CPU, a backend that ``auto`` chose falls back to torch with
    one line saying why; one the user asked for by name is refused with that line.
    """
    import sys

    from fedpt.models.llamacpp import check_runs_here, extra_buffers_enabled, gguf_path

    model = cfg.model
    specs = ([model.large] if model.large_backend == "llamacpp" else []) + \
        ([model.small] if model.small_proxy_backend == "llamacpp" else [])
    try:
        for spec in specs:
            check_runs_here(gguf_path(spec), extra_buffers_enabled())
    except FedPTError as err:
        keys = ("large_backend", "small_proxy_backend", "eval_engine")
        in_use = {key for key in keys if getattr(model, key) == "llamacpp"}
        if not in_use <= model.chosen_by_auto:
            raise  # asked for by name: the user decides
        print(f"note: 'auto' runs the models in torch, not llama.cpp: {err}", file=sys.stderr)
        if model.large_backend == "llamacpp":
            model.large_backend = "local"
        model.small_proxy_backend = model.eval_engine = "torch"


def weights_needed(cfg: FedPTConfig) -> tuple[int, int, int] | None:
    """(bytes the server holds, bytes one training device holds, devices training at once), or None
    when a size is not known up front.

    The server holds the small LM in torch, the large LM where its backend runs it (torch weights,
    the GGUF file llama.cpp maps, nothing for a remote service), the small GGUF when llama.cpp runs
    the proxy's small views, and, for fedavg-large with a non-torch large backend, a torch copy of
    the large LM that carries its adapter. Each device training at once holds the LM it tunes.
    """
    import os

    from fedpt.models.loading import gguf_bytes, weights_bytes

    model, fed = cfg.model, cfg.federation
    small = weights_bytes(model.small, model.dtype)
    large_torch = weights_bytes(model.large, model.dtype)
    served = {"local": large_torch, "llamacpp": gguf_bytes(model.large)}.get(model.large_backend, 0)
    fedavg_large = "fedavg-large" in cfg.run.systems
    small_views = gguf_bytes(model.small) if model.small_proxy_backend == "llamacpp" else 0
    if None in (small, served, small_views) or (fedavg_large and large_torch is None):
        return None
    server = small + served + small_views + (large_torch if fedavg_large and model.large_backend != "local" else 0)
    device = large_torch if fedavg_large else small
    concurrent = min(fed.clients_per_round, max(1, int((os.cpu_count() or 1) // fed.client_cpus)))
    return server, device, concurrent


def check_memory(cfg: FedPTConfig) -> None:
    """Refuse a run whose model weights alone exceed the memory available now (when their size is known).

    Activations come on top, so passing this check is necessary, not sufficient.
    """
    import psutil

    needed = weights_needed(cfg)
    if needed is None:
        return
    server, device, concurrent = needed
    need = server + concurrent * device
    available = psutil.virtual_memory().available
    if need > available:
        gib = 2**30
        raise FedPTError(f"the model weights alone need {need / gib:.1f} GiB in {resolve_dtype(cfg.model.dtype)} (server: "
                         f"{server / gib:.1f}, {concurrent} device(s) at once: {concurrent * device / gib:.1f}) "
                         f"but {available / gib:.1f} GiB is available: use smaller models, model.dtype='bfloat16', "
                         "or fewer devices at once (a larger federation.client_cpus)")


def check_resumable(cfg: FedPTConfig, out_dir: Path) -> None:
    """Every checkpoint must load (hash checked) and come from this config (rounds may grow)."""
    from fedpt.checkpoint import check_same_config, load_checkpoint

    for name in cfg.run.systems:
        folder = out_dir / name / "checkpoints"
        checkpoint = load_checkpoint(folder)
        if checkpoint is not None:
            check_same_config(checkpoint, cfg, folder)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty run directory is only replaced when the user says ``--overwrite``,
    and ``--overwrite`` only ever replaces a fedpt run. Checks only: nothing is written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FedPTError(f"output path {out_dir} exists and is not a directory")
    if _run_files(out_dir):
        if not overwrite:
            raise FedPTError(f"output directory {out_dir} already holds a run; pass --overwrite to replace it "
                             "or choose another --out")
        if not (out_dir / "config.toml").is_file():  # --overwrite deletes fedpt runs, nothing else
            raise FedPTError(f"{out_dir} is not empty and is not a fedpt run (no config.toml); "
                             "--overwrite will not delete it: choose another --out")


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """``check_out_dir``, then empty the directory (``--overwrite``) or create it.

    The lock file stays: the process replacing the run holds the lock on it.
    """
    check_out_dir(out_dir, overwrite)
    for path in _run_files(out_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _run_files(out_dir: Path) -> list[Path]:
    """What the directory holds besides the lock file."""
    return [p for p in out_dir.iterdir() if p.name != LOCK_NAME] if out_dir.is_dir() else []


@contextmanager
def prepared_run(cfg: FedPTConfig, out_dir: Path, overwrite: bool = False,
                 resume: bool = False) -> Iterator[dict[str, int]]:
    """Everything before the first round, for ``fedpt run`` and the ``flwr run .`` ServerApp alike.

    Preflight (config, data, partitions, vocabularies, memory) before anything is written; then
    the run directory's lock, held until the block ends (a second process on the same directory
    is refused naming this one's PID); then, under the lock, the checkpoints of a resumed run are
    checked, or a new run's directory is created (or replaced with ``overwrite``) with its
    ``config.toml`` and partition report. Yields the size of each evaluation set (for the summary).
    """
    histogram, eval_sizes = preflight(cfg)
    # Refuse before the lock file is created; checked again under the lock (another run may have moved on).
    if resume:
        check_resumable(cfg, out_dir)
    else:
        check_out_dir(out_dir, overwrite)
    with run_lock(out_dir):
        if resume:
            check_resumable(cfg, out_dir)
        else:
            prepare_out_dir(out_dir, overwrite)
            cfg.save(out_dir / "config.toml")
            write_partition_report(out_dir, histogram)
        yield eval_sizes


def run(cfg: FedPTConfig, out_dir: Path, overwrite: bool = False, verbose: bool = False,
        show_progress: bool = True, resume: bool = False) -> dict:
    """``fedpt run``: all configured systems in one Flower simulation; returns the summary.

    With ``resume``, ``out_dir`` is an earlier run: each system continues after its last
    checkpointed round (finished systems are skipped).
    """
    from fedpt.federation.simulation import simulate
    from fedpt.progress import Progress

    from fedpt import profile

    with prepared_run(cfg, out_dir, overwrite=overwrite, resume=resume) as eval_sizes:
        progress = Progress(cfg.run.systems, cfg.federation.rounds, enabled=show_progress)
        profile.reset()
        start = time.perf_counter()
        try:
            with PeakMemory() as memory:
                records = simulate(cfg, out_dir, progress, verbose)
        finally:
            progress.close()
        with profile.phase("summary writing"):
            summary = write_summary(out_dir, cfg, records, eval_sizes, time.perf_counter() - start,
                                    memory.peak_bytes)
        profile.write(out_dir / "profile.json", time.perf_counter() - start,
                      {"devices": device_work(cfg, records), "memory": memory.report()})
        return summary


def device_work(cfg: FedPTConfig, records: list[RoundRecord]) -> dict:
    """The devices' own clocks (other processes): device-seconds and tokens summed over device rounds
    (once per training group: FedAvg+PT's records repeat FedAvg-small's device rounds)."""
    from fedpt.systems import training_groups

    trained = {group[0] for group in training_groups(cfg.run.systems)}
    rows = [r for r in records if r.system in trained and r.round > 0 and r.device_train_seconds is not None]
    timed = [r for r in rows if r.device_busiest_seconds is not None]  # records from before these were kept lack them
    return {"device_rounds": sum(r.clients for r in rows),
            "device_seconds": sum(r.device_train_seconds * r.clients for r in rows),
            "tokens": sum((r.device_train_tokens or 0) * r.clients for r in rows),
            "prepare_seconds": sum(r.device_prepare_seconds * r.clients for r in timed) if timed else None,
            "busiest_seconds": sum(r.device_busiest_seconds for r in timed) if timed else None,
            "processes": max((r.device_processes for r in timed), default=None)}


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
    """``summary.json``: per system its pretrained and final records with 95% bootstrap intervals
    (from the saved predictions), the paper's comparisons as paired intervals, the target."""
    from fedpt.evaluate import protocol_name
    from fedpt.server import evaluation_engines
    from fedpt.systems import target_met
    from fedpt.intervals import BOOTSTRAP, comparisons, record_intervals

    systems = {}
    for name in cfg.run.systems:
        rows = [r for r in records if r.system == name]
        final = max(rows, key=lambda r: r.round) if rows else None
        pretrained = next((r for r in rows if r.round == 0), None)
        target = cfg.federation.target_rouge_l
        systems[name] = {
            "description": SYSTEM_SPECS[name].summary,
            "final": final.__dict__ if final else None,
            "pretrained": pretrained.__dict__ if pretrained else None,
            "ci": {"pretrained": record_intervals(out_dir, name, pretrained.__dict__ if pretrained else None),
                   "final": record_intervals(out_dir, name, final.__dict__ if final else None)},
            "predictions": str(out_dir / name / "predictions"),
            "adapter": str(out_dir / name / "adapter"),
            "rounds_run": final.round if final else 0,
            # device rounds whose update was not aggregated (crash, death, timeout, rejected): never silent
            "device_rounds": {"trained": sum(r.clients for r in rows if r.round > 0),
                              "lost": sum(r.failures for r in rows if r.round > 0),
                              "why": [f"round {r.round}: {p}" for r in rows if r.round > 0 for p in r.problems]},
            "target_rouge_l": {"target": target or None,
                               "reached": target_met(cfg, name, [r.__dict__ for r in rows]) if target else None},
        }
    sets = list(eval_sizes)
    final_rounds = {name: info["rounds_run"] for name, info in systems.items() if info["final"]}
    summary = {
        "systems": systems,
        "rounds": cfg.federation.rounds,
        "dtype": resolve_dtype(cfg.model.dtype),  # what "auto" became on this machine
        "engines": evaluation_engines(cfg),  # which engine judged which model (model.eval_engine)
        "eval_protocol": protocol_name(cfg.eval),
        "prompt_template": cfg.data.template,
        "eval_sets": eval_sizes,
        "bootstrap": BOOTSTRAP,
        "comparisons": comparisons(out_dir, final_rounds, sets),
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
    """Rouge-L per system and evaluation set with 95% bootstrap intervals: pretrained (round 0) and
    after the last round; then the paper's comparisons as paired intervals of the difference."""
    def cell(value: float | None, interval: dict | None) -> str:
        if value is None:
            return f"{'-':>21}"
        if interval is None:
            return f"{value:>21.2f}"
        return f"{value:>7.2f} [{interval['low']:5.1f},{interval['high']:5.1f}]"  # 21 wide

    header = (f"{'system':<14}{'eval set':<16}{'small@0':>21}{'large@0':>21}{'small':>21}{'proxy':>21}"
              f"{'large':>21}")
    ran = {name: info.get("rounds_run", summary["rounds"]) for name, info in summary["systems"].items()}
    after = (f"round {summary['rounds']}" if set(ran.values()) <= {summary["rounds"]}
             else "the last round (" + ", ".join(f"{name}: {n}" for name, n in ran.items()) + ")")
    lines = [f"Rouge-L ({summary['eval_protocol']}) [95% bootstrap CI over prompts]; @0 = pretrained, "
             f"others after {after}", header, "-" * len(header)]
    for name, info in summary["systems"].items():
        first, last = info["pretrained"] or {}, info["final"] or {}
        ci = info.get("ci") or {}
        ci0, ci1 = ci.get("pretrained") or {}, ci.get("final") or {}
        for set_name in (last.get("rougeL_sets") or first.get("rougeL_sets") or {}):
            before = first.get("rougeL_sets", {}).get(set_name, {})
            now = last.get("rougeL_sets", {}).get(set_name, {})
            b_ci, a_ci = ci0.get(set_name, {}), ci1.get(set_name, {})
            lines.append(f"{name:<14}{set_name:<16}{cell(before.get('small'), b_ci.get('small'))}"
                         f"{cell(before.get('large'), b_ci.get('large'))}{cell(now.get('small'), a_ci.get('small'))}"
                         f"{cell(now.get('proxy'), a_ci.get('proxy'))}{cell(now.get('large'), a_ci.get('large'))}")
    lines.append("small = tuned small LM; proxy = large LM proxy-tuned by it; large = large LM tuned directly")
    lost = {n: i["device_rounds"] for n, i in summary["systems"].items() if (i.get("device_rounds") or {}).get("lost")}
    for name, devices in lost.items():
        lines.append(f"{name}: {devices['lost']} of {devices['trained'] + devices['lost']} device rounds lost "
                     f"(first: {devices['why'][0]}); all in rounds.jsonl 'problems'")
    target = {n: i["target_rouge_l"] for n, i in summary["systems"].items() if (i.get("target_rouge_l") or {}).get("target")}
    if target:
        lines.append("target Rouge-L: " + ", ".join(
            f"{n} {'reached' if t['reached'] else 'not reached'} ({t['target']:g}, {summary['systems'][n]['rounds_run']} rounds)"
            for n, t in target.items()))
    if summary.get("comparisons"):
        lines.append("")
        lines.append("Paired comparisons (difference A - B, 95% paired bootstrap CI over the same prompts):")
        for row in summary["comparisons"]:
            lines.append(f"  {row['comparison']:<52}{row['set']:<16}{row['diff_estimate']:+7.2f} "
                         f"[{row['diff_low']:+6.2f},{row['diff_high']:+6.2f}]  {row['verdict']}")
    privacy = summary.get("privacy", {})
    if privacy.get("dp", "off") != "off":
        spent = ", ".join(f"{name} {e:.2f} at delta {privacy['delta'][name]:g}" if e is not None else f"{name} -"
                          for name, e in privacy["epsilon"].items())
        knob = (f"noise {privacy['noise_multiplier']}" if privacy["dp"] == "central"
                else f"epsilon {privacy['local_epsilon']} per round")
        lines.append(f"{privacy['dp']} DP ({knob}, clip {privacy['clipping_norm']}): epsilon {spent}")
    return "\n".join(lines)
