"""Saved predictions: the model outputs behind every Rouge-L a run reports.

Layout: ``<run>/<system>/predictions/round-0003.<eval set>.<model>.jsonl``, one row per prompt
(and per seed under the sampling protocol): ``id``, ``prompt`` (as the model saw it),
``prediction``, ``references``, ``rouge_l`` (that prompt's score, x100) and ``seed`` (None when
greedy). ``<model>`` is ``small`` / ``proxy`` / ``large`` after training, ``pretrained-small`` /
``pretrained-large`` at round 0 (every adapter is the identity then), ``proxy-alpha<A>`` in the
alpha sweep. A set's Rouge-L is the mean of ``rouge_l`` over its rows (every seed scores the
same prompts, so this equals the mean over seeds of the mean over prompts).

Files are written whole under a temporary name and renamed into place, so a file is either
complete or absent; a resumed round writes its files again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fedpt.errors import FedPTError

if TYPE_CHECKING:
    from fedpt.evaluate import EvalResult

FOLDER = "predictions"


def model_name(role: str, server_round: int) -> str:
    """The file name's model part for a record role (``small``/``proxy``/``large``) at a round.

    At round 0 the proxy-tuned large LM is the large LM itself (identity adapter).
    """
    if server_round == 0:
        return "pretrained-small" if role == "small" else "pretrained-large"
    return role


def prediction_path(run_dir: Path, system: str, server_round: int, set_name: str, model: str) -> Path:
    return run_dir / system / FOLDER / f"round-{server_round:04d}.{set_name}.{model}.jsonl"


def write_predictions(path: Path, result: "EvalResult") -> None:
    """Write ``result``'s rows atomically (complete file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in result.rows():
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise FedPTError(f"predictions file {path} is missing; re-run the evaluation that writes it")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def per_prompt_scores(rows: list[dict]) -> dict[str, float]:
    """{prompt id: Rouge-L averaged over its seeds}, in file order."""
    by_id: dict[str, list[float]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(float(row["rouge_l"]))
    return {pid: sum(values) / len(values) for pid, values in by_id.items()}


def remove_after(run_dir: Path, system: str, last_round: int) -> None:
    """Drop a system's prediction files of rounds after ``last_round`` (resume redoes those rounds)."""
    folder = run_dir / system / FOLDER
    for path in folder.glob("round-*.jsonl") if folder.is_dir() else ():
        if int(path.name.split(".")[0].removeprefix("round-")) > last_round:
            path.unlink()
