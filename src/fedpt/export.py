"""``fedpt export RUN DEST``: an experiment folder's finished systems, in the form a repository keeps.

``RUN`` is a ``fedpt experiment --out`` folder (checkpoints, fp32 adapters, locks, evals); ``DEST``
(e.g. ``results/paper-cpu``) gets, per finished system, everything ``fedpt report`` needs and
nothing else:

- ``config.toml`` (when DEST has none yet; otherwise RUN's must equal it, ``run.systems`` aside:
  one line names the keys that differ, and nothing is written);
- ``rounds.jsonl``: DEST's records of the other systems plus RUN's of the exported ones, sorted by
  system and round;
- ``<system>/predictions/*.jsonl``: every prediction file (training rounds and alpha sweep);
- ``<system>/adapter/``: the final LoRA adapter as bf16 safetensors with its peft config (the base
  model named by its config spec, not a path of this machine); for FedPT also
  ``<system>/adapter-pre-distillation/``, the last round's FedAvg'd adapter before distillation
  (the other expert the alpha sweep steers the large LM with);
- ``pieces.json`` (the invocations that ran them: CPU, dtype, wall time, command), ``alpha_sweep.json``
  and ``partitions.{json,md,png}``, merged;
- ``summary.json`` recomputed over everything DEST then holds (relative paths).

No checkpoints, no lock, no ``evals/``. Every file must stay under ``MAX_FILE_BYTES`` (10 MiB): a
larger one is refused before DEST is touched. A system DEST already holds is left alone when RUN's
is the same (records and prediction files identical) and refused when it differs, unless
``replace``. Files are staged next to DEST and moved in only after every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fedpt.config import SYSTEMS, load_config
from fedpt.errors import FedPTError
from fedpt.report import PIECES, SWEEP, Folder, ordered_sweep_keys, read_pieces, sweep_key

MAX_FILE_BYTES = 10 * 2**20
PRE_DISTILLATION = "adapter-pre-distillation"  # FedPT's other expert, beside adapter/
PARTITIONS = ("partitions.json", "partitions.md", "partitions.png")


def export_experiment(run: Path, dest: Path, systems: list[str] | None = None, replace: bool = False) -> list[str]:
    """Copy ``run``'s finished ``systems`` (default: all finished) into ``dest``; returns what it did, line by line."""
    from fedpt.experiment import config_differences

    if not (run / "config.toml").is_file():
        raise FedPTError(f"{run} is not an experiment folder (no config.toml)")
    source = Folder.read(run)
    finished = source.finished()
    for name in systems or []:
        if name not in finished:
            state = "has not run" if name not in source.ran() else "has not finished"
            raise FedPTError(f"{name} {state} in {run}: finish its piece first (fedpt experiment --systems {name})")
    wanted = [s for s in SYSTEMS if s in (systems or finished)]
    if not wanted:
        raise FedPTError(f"{run} has no finished system to export yet")
    for name in wanted:
        if not (run / name / "adapter" / "adapter_model.safetensors").is_file():
            raise FedPTError(f"{run / name / 'adapter'} holds no adapter: rerun its piece to finish it")
    if dest.exists() and not dest.is_dir():
        raise FedPTError(f"{dest} exists and is not a directory")
    target = Folder.read(dest) if dest.is_dir() else Folder(dest, None)
    if target.cfg is not None:
        changed = config_differences(target.cfg.to_dict(), source.cfg.to_dict())
        if changed:
            raise FedPTError(f"{dest} holds results of a different config: {'; '.join(changed)}; export only "
                             "experiments run with its config.toml (fedpt experiment --config "
                             f"{dest / 'config.toml'})")
    elif target.records:
        raise FedPTError(f"{dest} has rounds.jsonl but no config.toml: not an exported experiment")
    report, todo = [], []
    for name in wanted:
        if name in target.ran():
            if _same_system(source, target, name):
                report.append(f"{name}: already in {dest}, the same results")
                continue
            if not replace:
                raise FedPTError(f"{dest} already holds other results of {name}: pass --replace to replace them")
        todo.append(name)
    if not todo:
        return report + [f"nothing to write: {dest} is up to date"]

    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}-export-", dir=dest.parent))
    try:
        files = _stage(source, target, todo, stage)
        sizes = {rel: (stage / rel).stat().st_size for rel in files}
        too_big = [(rel, size) for rel, size in sizes.items() if size > MAX_FILE_BYTES]
        if too_big:
            rel, size = too_big[0]
            raise FedPTError(f"{rel} would be {size / 2**20:.1f} MiB, over the {MAX_FILE_BYTES / 2**20:.0f} MiB a "
                             f"committed file may have ({len(too_big)} such file(s)); nothing was written to {dest}")
        dest.mkdir(parents=True, exist_ok=True)
        for name in todo:  # a replaced system keeps no file of its earlier results
            for sub in ("predictions", "adapter", PRE_DISTILLATION):
                shutil.rmtree(dest / name / sub, ignore_errors=True)
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dest / rel)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_exported_summary(dest)
    for name in todo:
        count = len(list((dest / name / "predictions").glob("*.jsonl")))
        size = (dest / name / "adapter" / "adapter_model.safetensors").stat().st_size
        report.append(f"{name}: {count} prediction files, adapter {size / 2**20:.2f} MiB (bf16)")
    largest = max(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return report + [f"written: {dest} (largest file {largest / 2**20:.2f} MiB); next: fedpt report {dest}"]


def _same_system(source: Folder, target: Folder, name: str) -> bool:
    """Same records, alpha-sweep entries and prediction files (names and bytes) in both folders."""
    mine = [r.to_json() for r in source.records if r.system == name]
    theirs = [r.to_json() for r in target.records if r.system == name]
    if mine != theirs:
        return False
    swept = lambda folder: {k: v for k, v in folder.sweep.items() if sweep_key(k)[0] == name}  # noqa: E731
    if swept(source) != swept(target):
        return False
    a, b = source.path / name / "predictions", target.path / name / "predictions"
    names = sorted(p.name for p in a.glob("*.jsonl"))
    return names == sorted(p.name for p in b.glob("*.jsonl")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _stage(source: Folder, target: Folder, systems: list[str], stage: Path) -> list[str]:
    """Write every file the export changes under ``stage``; returns their paths relative to it."""
    from fedpt.federation.strategy import aggregated_adapter_path

    files: list[str] = []

    def write(rel: str, data: bytes | str) -> None:
        path = stage / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        files.append(rel)

    if target.cfg is None:
        write("config.toml", (source.path / "config.toml").read_bytes())
    for name in PARTITIONS:
        if (source.path / name).is_file() and not (target.path / name).is_file():
            write(name, (source.path / name).read_bytes())
    order = {name: i for i, name in enumerate(SYSTEMS)}
    records = [r for r in target.records if r.system not in systems] + \
              [r for r in source.records if r.system in systems]
    records.sort(key=lambda r: (order[r.system], r.round))
    write("rounds.jsonl", "".join(r.to_json() + "\n" for r in records))
    pieces = read_pieces(target.path) if target.path.is_dir() else []
    known = {(p.get("started"), tuple(p.get("systems", []))) for p in pieces}
    pieces += [p for p in read_pieces(source.path) if set(p.get("systems", [])) & set(systems)
               and (p.get("started"), tuple(p.get("systems", []))) not in known]
    pieces.sort(key=lambda p: p.get("started") or "")
    write(PIECES, json.dumps(pieces, indent=1) + "\n")
    # a sweep key is a system, or a system's other expert ("fedpt:aggregated"): it goes with its system
    sweep = {s: v for s, v in target.sweep.items() if sweep_key(s)[0] not in systems} | \
            {s: v for s, v in source.sweep.items() if sweep_key(s)[0] in systems}
    if sweep:
        write(SWEEP, json.dumps({key: sweep[key] for key in ordered_sweep_keys(sweep)}, indent=1) + "\n")
    for name in systems:
        for path in sorted((source.path / name / "predictions").glob("*.jsonl")):
            write(f"{name}/predictions/{path.name}", path.read_bytes())
        write(f"{name}/adapter/adapter_model.safetensors",
              bf16_adapter(source.path / name / "adapter" / "adapter_model.safetensors"))
        config = _adapter_config(source, name)
        write(f"{name}/adapter/adapter_config.json", config)
        # FedPT's last FedAvg'd adapter before distillation: the other expert the report compares
        aggregated = aggregated_adapter_path(source.path, name, source.final_rounds([name])[name])
        if aggregated.is_file():
            write(f"{name}/{PRE_DISTILLATION}/adapter_model.safetensors", bf16_adapter(aggregated))
            write(f"{name}/{PRE_DISTILLATION}/adapter_config.json", config)
    return files


def bf16_adapter(path: Path) -> bytes:
    """The adapter file's tensors in bfloat16, as safetensors bytes (peft loads them into any dtype)."""
    import torch
    from safetensors.torch import load_file, save

    tensors = load_file(path)
    return save({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})


def _adapter_config(source: Folder, name: str) -> str:
    """peft's adapter config, its base model named by the config's spec instead of this machine's cache path."""
    from fedpt.systems import SYSTEM_SPECS

    config = json.loads((source.path / name / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = getattr(source.cfg.model, SYSTEM_SPECS[name].device_model)
    if isinstance(config.get("target_modules"), list):  # peft writes a set: its order changes per process
        config["target_modules"] = sorted(config["target_modules"])
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_exported_summary(dest: Path) -> None:
    """``summary.json`` over every system in ``dest``, with paths relative to it; dtype and wall time are per
    piece (``pieces.json``), so the summary names no machine."""
    import dataclasses

    from fedpt.report import _set_sizes
    from fedpt.runner import write_summary

    folder = Folder.read(dest)
    cfg = dataclasses.replace(folder.cfg, run=dataclasses.replace(folder.cfg.run, systems=folder.ran()))
    summary = write_summary(dest, cfg, folder.records, _set_sizes(folder), None, None)
    for name, info in summary["systems"].items():
        info["predictions"], info["adapter"] = f"{name}/predictions", f"{name}/adapter"
    summary["dtype"] = {p_system: p.get("dtype") for p in folder.pieces for p_system in p.get("systems", [])
                        if p_system in summary["systems"]}
    summary["pieces"] = PIECES
    tmp = dest / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, dest / "summary.json")


def check_committed(dest: Path) -> list[str]:
    """Files in ``dest`` that a repository should not hold: checkpoints, locks, or over ``MAX_FILE_BYTES``."""
    bad = []
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        rel = path.relative_to(dest).as_posix()
        if "checkpoints" in path.relative_to(dest).parts or path.name == ".fedpt.lock":
            bad.append(f"{rel}: not committed (checkpoint or lock)")
        elif path.stat().st_size > MAX_FILE_BYTES:
            bad.append(f"{rel}: {path.stat().st_size / 2**20:.1f} MiB, over {MAX_FILE_BYTES / 2**20:.0f} MiB")
    return bad
