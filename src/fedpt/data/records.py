"""Instruction records: read JSONL strictly (errors name the file and line), split, partition.

A record is ``{"instruction", "context" (or "input"), "response" (or "output"), "category"}``
(Dolly's fields). The evaluation set keeps every acceptable reference; Rouge-L takes the max.
Knows a tokenizer at most; no model, no Flower.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fedpt.errors import FedPTError

BUILTIN_SOURCES = {
    "dolly-tiny": "dolly-tiny.jsonl",  # 643 short Dolly records: the tiny preset
    "dolly-15k": "dolly-15k.jsonl.gz",  # databricks-dolly-15k, complete: device data + held-out split
    "self-instruct": "self-instruct-252.jsonl",  # Self-Instruct user-oriented, 252 (evaluation only)
    "sni": "sni-test.jsonl",  # S-NI test instances at hand, reference > 11 tokens (evaluation only)
}


@dataclass(frozen=True)
class Example:
    instruction: str
    context: str = ""
    response: str = ""
    category: str = "none"
    references: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        """Identity used to keep device data, KD prompts and evaluation disjoint."""
        return (self.instruction.strip(), self.context.strip())

    @property
    def all_references(self) -> tuple[str, ...]:
        return self.references or (self.response,)


@dataclass(frozen=True)
class Splits:
    train: list[Example]  # partitioned among devices
    eval: list[Example]  # held out: never trained or distilled on
    kd_pool: list[Example]  # server prompts: instructions only (responses dropped)


def resolve_source(source: str) -> Path:
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN_SOURCES:
            raise FedPTError(f"unknown built-in data set '{name}': choose from {', '.join(BUILTIN_SOURCES)}")
        return Path(str(resources.files("fedpt") / "data" / "vendored" / BUILTIN_SOURCES[name]))
    path = Path(source).expanduser()
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return path  # a Hugging Face dataset saved with save_to_disk()
    if not path.is_file():
        raise FedPTError(f"data file {path} does not exist (data.source)")
    return path


def parse_field_map(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["instruction=question", "response=answer"]`` -> {our field: the file's column}."""
    mapping = {}
    for pair in pairs:
        ours, sep, theirs = pair.partition("=")
        if not sep or ours not in FIELDS or not theirs:
            raise FedPTError(f"data.fields entry '{pair}' must be <field>=<column> with <field> one of "
                             f"{', '.join(FIELDS)}")
        mapping[ours] = theirs
    return mapping


FIELDS = ("instruction", "context", "response", "category", "references")


def load_examples(source: str, fields: list[str] | tuple[str, ...] = ()) -> list[Example]:
    """Read every record of a JSONL (.jsonl, .jsonl.gz) or CSV file, or of a Hugging Face dataset
    saved with ``save_to_disk``; a broken record is an error naming the file and the line (row).
    ``fields`` renames the file's columns (``data.fields``)."""
    path = resolve_source(source)
    mapping = parse_field_map(fields)
    examples = [_to_example(_renamed(raw, mapping), f"{path}:{line_no}") for line_no, raw in _raw_records(path)]
    if not examples:
        raise FedPTError(f"{path} holds no records")
    return examples


def _renamed(raw: dict, mapping: dict[str, str]) -> dict:
    """The record with our field names added from the mapped columns."""
    return {**raw, **{ours: raw[theirs] for ours, theirs in mapping.items() if theirs in raw}}


def _raw_records(path: Path):
    """(line number, dict) per record; for a saved HF dataset the "line" is the row number + 1."""
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if not hasattr(dataset, "features"):  # a DatasetDict: which split is meant is ambiguous
            raise FedPTError(f"{path} holds several splits ({', '.join(dataset)}); save the one to use alone")
        for row_no, row in enumerate(dataset, start=1):
            yield row_no, dict(row)
        return
    if path.suffix == ".csv":
        _check_utf8(path, path.read_bytes())
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                if None in row:  # more cells than header columns
                    raise FedPTError(f"{path}:{reader.line_num}: more cells than the header has columns")
                yield reader.line_num, row
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line_no, raw_line in enumerate(handle, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise FedPTError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw_line[err.start]:02x} at column "
                                 f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise FedPTError(f"{path}:{line_no}: not valid JSON ({err.msg}); fix or remove the line") from None
            if not isinstance(raw, dict):
                raise FedPTError(f"{path}:{line_no}: expected a JSON object, got {type(raw).__name__}")
            yield line_no, raw


def _check_utf8(path: Path, data: bytes) -> None:
    """A file that is not UTF-8 is an error naming the line of the first bad byte, not a traceback."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise FedPTError(f"{path}:{line_no}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _to_example(raw: dict, where: str) -> Example:
    instruction = raw.get("instruction")
    response = raw.get("response", raw.get("output"))
    context = raw.get("context", raw.get("input", "")) or ""
    if not isinstance(instruction, str) or not instruction.strip():
        raise FedPTError(f"{where}: missing or empty 'instruction' field")
    if not isinstance(response, str):
        raise FedPTError(f"{where}: missing 'response' (or 'output') string field")
    if not isinstance(context, str):
        raise FedPTError(f"{where}: 'context' must be a string")
    references = raw.get("references", [])
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise FedPTError(f"{where}: 'references' must be a list of strings")
    return Example(instruction, context, response, str(raw.get("category", "none")), tuple(references))


def split_examples(examples: list[Example], eval_size: int, kd_pool_size: int, seed: int) -> Splits:
    """Held-out eval set (stratified by category), then the KD prompt pool, then device data.

    Duplicates (same instruction and input) are merged first so that no prompt can fall on
    two sides of a split.
    """
    unique: dict[tuple[str, str], Example] = {}
    for ex in examples:
        unique.setdefault(ex.key, ex)
    pool = list(unique.values())
    need = eval_size + kd_pool_size + 1
    if len(pool) < need:
        raise FedPTError(
            f"the data has {len(pool)} distinct records, fewer than eval_size + kd_pool_size + 1 = {need}; "
            "lower data.eval_size / data.kd_pool_size or use a larger data.source"
        )
    rng = random.Random(seed)
    rng.shuffle(pool)
    eval_set = _stratified_take(pool, eval_size)
    taken = {ex.key for ex in eval_set}
    rest = [ex for ex in pool if ex.key not in taken]
    kd_pool = [Example(ex.instruction, ex.context, "", ex.category) for ex in rest[:kd_pool_size]]
    splits = Splits(train=rest[kd_pool_size:], eval=eval_set, kd_pool=kd_pool)
    check_disjoint(splits)
    return splits


def source_name(source: str) -> str:
    """Short name of a data source for tables: the built-in name or the file's stem."""
    return source.removeprefix("builtin:") if source.startswith("builtin:") else Path(source).name.split(".")[0]


def load_eval_set(source: str, size: int, seed: int, fields: list[str] | tuple[str, ...] = ()) -> list[Example]:
    """An evaluation-only source, capped at ``size`` records (0 = all), stratified by category."""
    examples = list({ex.key: ex for ex in load_examples(source, fields)}.values())
    if size and size < len(examples):
        random.Random(seed).shuffle(examples)
        examples = _stratified_take(examples, size)
    return examples


def _stratified_take(pool: list[Example], size: int) -> list[Example]:
    """Round-robin over categories (in a fixed order) so every category is represented."""
    by_category: dict[str, list[Example]] = defaultdict(list)
    for ex in pool:
        by_category[ex.category].append(ex)
    queues = [by_category[c] for c in sorted(by_category)]
    taken: list[Example] = []
    while len(taken) < size:
        for queue in queues:
            if queue and len(taken) < size:
                taken.append(queue.pop(0))
    return taken


def check_disjoint(splits: Splits, extra_eval: dict[str, list[Example]] | None = None) -> None:
    """The KD pool and device data must never contain an evaluation prompt, nor each other's."""
    train, evals, kd = ({ex.key for ex in s} for s in (splits.train, splits.eval, splits.kd_pool))
    pairs = [(train, evals, "device data and eval"), (kd, evals, "KD pool and eval"),
             (train, kd, "device data and KD pool")]
    for name, examples in (extra_eval or {}).items():
        keys = {ex.key for ex in examples}
        pairs += [(train, keys, f"device data and eval set {name}"), (kd, keys, f"KD pool and eval set {name}")]
    for a, b, what in pairs:
        overlap = a & b
        if overlap:
            raise FedPTError(f"{what} share {len(overlap)} prompt(s), e.g. {next(iter(overlap))[0][:60]!r}")
