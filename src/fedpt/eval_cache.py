"""Finished evaluations kept on disk, keyed by everything that determines them.

An evaluation set of 100 prompts on the large LM takes minutes on a CPU; a run stopped in the
middle of a round's evaluation used to redo all of it. ``EvalCache`` stores each (model, set)
result the moment it is done under ``<run>/eval-cache/<key>.json``, where the key is a hash of

- the run's config (every key but ``run.systems``, so that the pieces of one experiment, which
  differ only there, share the pretrained models' scores),
- the model's identity (``"small"``/``"large"`` for the pretrained models; the role plus a digest
  of the adapter tensors, and alpha for the proxy, after training),
- the set's name and the ids of its prompts.

A hit is therefore the same computation, not a guess: a resumed run that retrains a round to a
different adapter misses the cache. Without a folder (tests, ``fedpt run`` into no directory)
the cache lives in memory only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedpt.evaluate import EvalResult

FOLDER = "eval-cache"


def adapter_digest(state: dict[str, Any]) -> str:
    """A short hash of adapter tensors (names, shapes, fp32 values)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().float().contiguous().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def _to_json(result: EvalResult) -> str:
    return json.dumps(dataclasses.asdict(result))


def _from_json(text: str) -> EvalResult:
    data = json.loads(text)
    data["samples"] = [tuple(pair) for pair in data["samples"]]
    data["references"] = [tuple(refs) for refs in data["references"]]
    return EvalResult(**data)


class EvalCache:
    def __init__(self, config: dict[str, Any], folder: Path | None = None) -> None:
        config = {section: dict(values) for section, values in config.items()}
        config.get("run", {}).pop("systems", None)
        self._config = json.dumps(config, sort_keys=True, default=str)
        self.folder = folder
        self._memory: dict[str, EvalResult] = {}

    def key(self, model: str, set_name: str, example_ids: list[str]) -> str:
        text = json.dumps([self._config, model, set_name, example_ids])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, key: str) -> EvalResult | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            result = _from_json(path.read_text())
        except (ValueError, TypeError, KeyError):  # a torn or foreign file: recompute, never trust it
            return None
        self._memory[key] = result
        return result

    def put(self, key: str, result: EvalResult) -> None:
        self._memory[key] = result
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(_to_json(result))
        os.replace(partial, path)  # a stop mid-write leaves no half file under the real name

    def _path(self, key: str) -> Path | None:
        return self.folder / f"{key}.json" if self.folder is not None else None
