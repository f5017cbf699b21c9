"""``fedpt experiment``: the paper's comparison on this machine, in pieces, resumable.

1. FedAvg-small, FedAvg-large, FedAvg+PT and FedPT with identical data, seeds and budgets. All four
   in one go (no ``--systems``), or in **pieces**: ``--systems fedavg-large`` runs just those systems
   into the same folder, later or on another machine. The folder's ``config.toml`` fixes the
   experiment (data, splits, seeds, models, budgets: every key but ``run.systems``); a piece with any
   other config is refused in one line naming the keys, before anything is touched. A piece is one
   ``fedpt run`` of its systems into the folder: every system keeps its own checkpoints,
   predictions, adapter and records (``rounds.jsonl`` holds every system's), so pieces coexist and a
   stopped piece resumes when its command is run again;
2. an alpha sweep of the proxy-tuned large LM built from FedPT's final adapter, in the piece that
   runs fedpt (each alpha saved as it finishes; model, set, prompts and ETA shown as it goes);
3. ``pieces.json``: per invocation its systems, command, CPU (``fedpt.cpu.cpu_summary``), cores,
   dtype, wall time, peak memory and the model sizes the cost table needs;
4. ``summary.json`` over every system in the folder, and ``results.md`` with its plots, written by
   ``fedpt.report`` from the folder's files alone (what ``fedpt report DIR`` writes too).

Every Rouge-L in ``results.md`` comes with a 95% bootstrap interval over prompts and names the
prediction file it is the mean of (``fedpt.predictions``); the paper's comparisons are paired
bootstrap intervals of the difference (``fedpt.intervals``), and a claim is stated only where
the interval excludes zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from fedpt.config import SYSTEMS, FedPTConfig, load_config
from fedpt.errors import FedPTError
from fedpt.metrics import RoundLog, RoundRecord
from fedpt.models.loading import resolve_dtype
from fedpt.report import AGGREGATED, PIECES, read_pieces, sweep_file, sweep_key, write_report

DEFAULT_ALPHAS = (0.5, 1.0, 1.5, 2.0)


def run_experiment(cfg: FedPTConfig, out_dir: Path, alphas: tuple[float, ...] = DEFAULT_ALPHAS,
                   verbose: bool = False, show_progress: bool = True, command: str = "fedpt experiment",
                   systems: list[str] | None = None) -> Path:
    """Run ``systems`` (default: all four) into the experiment folder ``out_dir``; returns results.md.

    ``cfg`` is the experiment's config; its ``run.systems`` is ignored (the experiment's are all
    four). Pass a config loaded with every system so that "auto" backends resolve as they would for
    the whole experiment (the CLI does): every piece then runs the same way.
    """
    from fedpt.runlock import run_lock
    from fedpt.runner import run

    piece = piece_systems(systems)
    cfg.run.systems = list(SYSTEMS)
    cfg.validate()
    check_experiment_folder(cfg, out_dir)  # before the lock file: a refused piece touches nothing
    with run_lock(out_dir):  # the whole piece: its runs, the alpha sweep, summary and results.md
        check_experiment_folder(cfg, out_dir)
        resume = (out_dir / "config.toml").is_file()
        piece_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, systems=piece))
        started, started_at = time.perf_counter(), _now()
        # A first piece's run creates the folder (it must find it empty): it is recorded right after.
        entry = start_piece(out_dir, cfg, piece, command, started_at) if resume else None
        summary = run(piece_cfg, out_dir, verbose=verbose, show_progress=show_progress, resume=resume)
        cfg.save(out_dir / "config.toml")  # the experiment's config (a first piece's run wrote its own systems)
        if entry is None:
            entry = start_piece(out_dir, cfg, piece, command, started_at)
        if "fedpt" in piece:
            alpha_sweep(cfg, out_dir, alphas, show_progress=show_progress)
        params = count_params(cfg, piece)
        write_experiment_summary(out_dir, cfg, summary["eval_sets"])
        finish_piece(out_dir, entry, time.perf_counter() - started, summary["peak_memory_bytes"], params)
        return write_report(out_dir)


def piece_systems(systems: list[str] | None) -> list[str]:
    """The systems of a piece, in the experiment's order (None or empty: all)."""
    for name in systems or []:
        if name not in SYSTEMS:
            raise FedPTError(f"unknown system '{name}' in --systems: choose from {', '.join(SYSTEMS)} or all")
    return [name for name in SYSTEMS if not systems or name in systems]


def config_differences(saved: dict, current: dict) -> list[str]:
    """``section.key (folder: A, this piece: B)`` for every key that differs, ``run.systems`` aside."""
    changed = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) != ("run", "systems") and a.get(key) != b.get(key):
                changed.append(f"{section}.{key} (folder: {a.get(key)!r}, this piece: {b.get(key)!r})")
    return changed


def check_experiment_folder(cfg: FedPTConfig, out_dir: Path) -> None:
    """``out_dir`` is new, empty, or an experiment with this config (any systems). Checks only."""
    from fedpt.runlock import LOCK_NAME

    if (out_dir / "config.toml").is_file():
        saved = load_config(path=out_dir / "config.toml")
        changed = config_differences(saved.to_dict(), cfg.to_dict())
        if changed:
            raise FedPTError(f"{out_dir} holds an experiment with a different config: {'; '.join(changed)}; every "
                             f"piece must use the folder's config (--config {out_dir / 'config.toml'}), or choose "
                             "another --out")
    elif out_dir.exists() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise FedPTError(f"{out_dir} exists and is not a fedpt experiment; choose another --out")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_pieces(out_dir: Path, pieces: list[dict]) -> None:
    tmp = out_dir / f".{PIECES}.tmp"
    tmp.write_text(json.dumps(pieces, indent=1) + "\n")
    os.replace(tmp, out_dir / PIECES)


def start_piece(out_dir: Path, cfg: FedPTConfig, systems: list[str], command: str, started_at: str) -> int:
    """Record an invocation in ``pieces.json`` as it starts (a stopped one stays, untimed); its index."""
    import fedpt
    from fedpt.cpu import cpu_summary

    pieces = read_pieces(out_dir)
    pieces.append({"systems": systems, "command": command, "started": started_at, "finished": None,
                   "wall_seconds": None, "peak_memory_bytes": None, "cpu": cpu_summary(), "cores": os.cpu_count(),
                   "dtype": resolve_dtype(cfg.model.dtype), "fedpt": fedpt.__version__, "params": {}})
    _write_pieces(out_dir, pieces)
    return len(pieces) - 1


def finish_piece(out_dir: Path, index: int, wall_seconds: float, peak_memory_bytes: int | None,
                 params: dict[str, list[int]]) -> None:
    pieces = read_pieces(out_dir)
    pieces[index] |= {"finished": _now(), "wall_seconds": round(wall_seconds, 1),
                      "peak_memory_bytes": peak_memory_bytes, "params": params}
    _write_pieces(out_dir, pieces)


def count_params(cfg: FedPTConfig, systems: list[str]) -> dict[str, list[int]]:
    """{role: [LoRA parameters, all parameters]} of the LMs these systems' devices tune (cost table)."""
    from fedpt.models.loading import load_model
    from fedpt.models.lora import attach_lora, count_trainable
    from fedpt.systems import SYSTEM_SPECS

    params = {}
    for role in dict.fromkeys(SYSTEM_SPECS[name].device_model for name in systems):
        model = attach_lora(load_model(getattr(cfg.model, role), cfg.model.dtype), cfg.lora, seed=0)
        params[role] = [count_trainable(model), sum(p.numel() for p in model.parameters())]
        del model
    return params


def write_experiment_summary(out_dir: Path, cfg: FedPTConfig, eval_sizes: dict[str, int]) -> dict:
    """``summary.json`` over every system in the folder (a piece's run wrote one for its own systems only).

    Wall time and peak memory are per piece: ``pieces.json``.
    """
    from fedpt.runner import write_summary

    records = RoundLog(out_dir / "rounds.jsonl").records
    ran = [name for name in SYSTEMS if any(r.system == name for r in records)]
    folder_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, systems=ran))
    return write_summary(out_dir, folder_cfg, records, eval_sizes, None, None)


def final_rounds(records: list[RoundRecord]) -> dict[str, int]:
    """Each system's last recorded round (earlier than federation.rounds if it met its target)."""
    last: dict[str, int] = {}
    for r in records:
        last[r.system] = max(last.get(r.system, 0), r.round)
    return last


def alpha_sweep(cfg: FedPTConfig, out_dir: Path, alphas: tuple[float, ...],
                systems: tuple[str, ...] = ("fedpt",), show_progress: bool = True) -> dict:
    """Rouge-L of FedPT's proxy-tuned large LM per alpha (the paper's Figure 4), final adapter.

    The run's own alpha was already scored at the last round: that record (and its prediction
    file) is reused. ``eval.sweep_sets`` / ``eval.sweep_size`` restrict the sweep to some sets
    and to their first prompts (a cheaper sweep); the run's own alpha then reads the same
    prompts from its last round's predictions. Each other alpha writes its own predictions.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpt.evaluate import decodings, protocol_name
    from fedpt.faults import pause_point
    from fedpt.federation.strategy import aggregated_adapter_path
    from fedpt.predictions import per_prompt_scores, read_predictions, write_predictions
    from fedpt.progress import PromptProgress, evaluate_sets
    from fedpt.server import ServerModels, load_splits

    path = out_dir / "alpha_sweep.json"
    sweep: dict = json.loads(path.read_text()) if path.is_file() else {}
    records = RoundLog(out_dir / "rounds.jsonl").records
    last = final_rounds(records)
    final = {r.system: r for r in records if r.round == last.get(r.system)}
    wanted = sweep_sets(cfg, [name for r in records for name in r.rougeL_sets])
    for system in systems:
        if cfg.proxy.alpha in alphas and system in final and final[system].rougeL_sets:
            scores = {}
            for name in wanted:
                rows = read_predictions(sweep_file(out_dir, cfg, system, last[system], name, cfg.proxy.alpha))
                values = list(per_prompt_scores(rows).values())[:cfg.eval.sweep_size or None]
                scores[name] = sum(values) / len(values)
            sweep.setdefault(system, {})[str(cfg.proxy.alpha)] = scores
    # FedPT's own expert is distilled: its difference from the base also carries what the large LM
    # taught it, so alpha = 1 may count the large LM twice. The last round's pre-distillation
    # adapter (what step 4 steered with) is swept too, where the run saved it.
    experts = {system: out_dir / system / "adapter" / "adapter_model.safetensors" for system in systems}
    for system in systems:
        aggregated = aggregated_adapter_path(out_dir, system, last.get(system, 0))
        if system in final and aggregated.is_file():
            experts[system + AGGREGATED] = aggregated
    todo = [(key, alpha) for alpha in alphas for key in experts if str(alpha) not in sweep.get(key, {})]
    # The run's own alpha first: for the pre-distillation expert it is the question the sweep is for
    todo.sort(key=lambda item: item[1] != cfg.proxy.alpha)
    if not todo:
        return sweep
    server = ServerModels.load(cfg, load_splits(cfg), large_trainable=False, run_dir=out_dir)
    server.eval_sets = {name: server.eval_sets[name][:cfg.eval.sweep_size or None] for name in wanted}
    total = len(todo) * sum(len(e) for e in server.eval_sets.values()) * len(decodings(cfg.eval))
    progress = PromptProgress("alpha sweep", total, protocol_name(cfg.eval), enabled=show_progress)
    try:
        for system, alpha in todo:
            owner = sweep_key(system)[0]
            pause_point("alpha-sweep", last[owner])  # tests stop the command here
            set_peft_model_state_dict(server.small, load_file(experts[system]))
            results = evaluate_sets(server, server.proxy_tune(alpha=alpha), f"{system} proxy alpha={alpha:g}",
                                    progress, identity=server.identity("proxy", alpha))
            for name, result in results.items():
                write_predictions(sweep_file(out_dir, cfg, system, last[owner], name, alpha), result)
            sweep.setdefault(system, {})[str(alpha)] = {name: r.rouge_l for name, r in results.items()}
            path.write_text(json.dumps(sweep, indent=1))  # saved per alpha: a stop loses at most one
            progress.note(f"alpha sweep: {system} alpha={alpha}: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in sweep[system][str(alpha)].items()))
    finally:
        progress.close()
    return sweep


def sweep_sets(cfg: FedPTConfig, names: list[str]) -> list[str]:
    """The evaluation sets the alpha sweep covers (``eval.sweep_sets``; empty = all), in run order."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in cfg.eval.sweep_sets if n not in names]
    if unknown:
        raise FedPTError(f"eval.sweep_sets names {', '.join(unknown)}, not an evaluation set of this run "
                         f"({', '.join(names)})")
    return [n for n in names if not cfg.eval.sweep_sets or n in cfg.eval.sweep_sets]
