"""Per-system, per-round checkpoints so a stopped run resumes from its last complete round.

Layout under ``<out>/<system>/checkpoints/``: one directory per saved round
(``round-0003/adapter.safetensors`` + ``meta.json`` holding the round, the adapter file's
SHA-256, the run config it was made with, that system's round records so far and the
strategy's state, e.g. the DP accountant's) and a ``latest`` file naming the newest. Nothing
else needs saving: optimizers are fresh every round and every random draw is seeded from
(run seed, round, device). A checkpoint directory is written completely
under a temporary name and renamed into place; ``latest`` is replaced atomically afterwards.
A crash at any point leaves the previous checkpoint valid. A corrupt or truncated checkpoint
is detected by its hash and reported, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpt.config import FedPTConfig
from fedpt.errors import FedPTError
from fedpt.faults import kill_point

KEEP = 2  # checkpoints kept per system (the newest and one before it)


@dataclass
class Checkpoint:
    round: int
    adapter: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the run config that produced it
    records: list[dict[str, Any]] | None = None  # this system's rounds.jsonl rows up to `round`
    state: dict[str, Any] = field(default_factory=dict)  # strategy state (DP accountant)


def save_checkpoint(folder: Path, server_round: int, adapter: dict[str, Any], config: dict[str, Any] | None = None,
                    records: list[dict[str, Any]] | None = None, state: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".round-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".round-", dir=folder))
    save_file({k: v.contiguous() for k, v in adapter.items()}, tmp / "adapter.safetensors")
    kill_point("checkpoint-write", server_round)
    meta = {"round": server_round, "sha256": _sha256(tmp / "adapter.safetensors"), "config": config or {},
            "records": records, "state": state or {}}
    (tmp / "meta.json").write_text(json.dumps(meta))
    final = folder / f"round-{server_round:04d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    kill_point("checkpoint-publish", server_round)  # complete, but `latest` still names the one before
    _write_atomic(folder / "latest", final.name)
    for old in sorted(p for p in folder.glob("round-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest complete checkpoint, or None when there is none yet."""
    from safetensors.torch import load_file

    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    try:
        meta = json.loads((path / "meta.json").read_text())
        if _sha256(path / "adapter.safetensors") != meta["sha256"]:
            raise ValueError("adapter hash does not match meta.json")
        return Checkpoint(int(meta["round"]), load_file(path / "adapter.safetensors"), meta.get("config", {}),
                          meta.get("records"), meta.get("state", {}))
    except (OSError, ValueError, KeyError) as err:
        raise FedPTError(f"checkpoint {path} is corrupt or incomplete ({err}); delete it to restart that "
                         "system from scratch") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# May change between a run and its resume: more rounds continue the same run, and a large-LM
# service that moved (new address, new key) serves the same model (its vocabulary is re-checked).
# A checkpoint is one system's: the other systems run beside it (an experiment's pieces) change
# none of its seeds or numbers (tests/test_pieces.py).
UNCOMPARED = {("federation", "rounds"), ("model", "large_url"), ("model", "large_api_key_file"),
              ("run", "systems")}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs between a checkpoint's config and the run's (``federation.rounds``
    may grow: resuming with more rounds continues the same run). Keys the checkpoint predates
    are not compared."""
    changed = []
    for section, a in sorted(saved.items()):
        b = current.get(section, {})
        for key in sorted(a):
            if (section, key) not in UNCOMPARED and a.get(key) != b.get(key):
                changed.append(f"{section}.{key}")
    return changed


def check_same_config(checkpoint: Checkpoint, cfg: FedPTConfig, folder: Path) -> None:
    """A checkpoint only continues the run that wrote it (``federation.rounds`` may grow)."""
    changed = config_changes(checkpoint.config, cfg.to_dict())
    if changed:
        raise FedPTError(f"{folder} was written with a different config ({', '.join(changed[:5])} changed); "
                         "resume with the run's own config.toml or start a new run")
