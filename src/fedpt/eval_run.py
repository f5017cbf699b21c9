"""``fedpt eval``: score a finished run's models on any instruction set, without retraining.

The models: the pretrained small and large LMs, and per system its tuned small LM, the large LM
proxy-tuned by it, or (fedavg-large) the large LM tuned directly, from ``<run>/<system>/adapter``.
The protocol is the run's ``[eval]`` (override with ``--set eval.key=value``); data in any format
``data.source`` accepts (JSONL, JSONL.gz, CSV, a saved HF dataset, ``builtin:NAME``;
``--set data.fields=[...]`` maps columns, ``--set data.eval_sets_size=N`` caps each set).

Output goes to a new folder ``<run>/evals/<name>/`` (never over the training results): the same
``summary.json`` (with intervals and paired comparisons), ``table.txt`` and
``<system>/predictions/`` files as a training run, plus ``eval.json`` naming the data and the
prompts it shares with the run's device data or KD pool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedpt.config import load_config
from fedpt.errors import FedPTError
from fedpt.metrics import RoundRecord
from fedpt.systems import SYSTEM_SPECS

MODELS = ("pretrained-small", "pretrained-large", "small", "proxy", "large")
ALLOWED_DATA_KEYS = ("fields", "eval_sets_size")  # how to read the data; nothing that changes the models


def default_models(system: str) -> list[str]:
    """What a system reports: its tuned small LM and proxy-tuned large LM, or its tuned large LM."""
    spec = SYSTEM_SPECS[system]
    if spec.device_model == "large":
        return ["large"]
    return ["small", "proxy"] if spec.proxy else ["small"]


def evaluate_run(run_dir: Path, data: list[str] | None = None, overrides: list[str] | None = None,
                 systems: list[str] | None = None, models: list[str] | None = None,
                 name: str | None = None, show_progress: bool = True) -> tuple[Path, dict]:
    """Evaluate ``run_dir``'s models; returns the output folder and its summary.

    With ``show_progress``, stderr shows the model, set, prompt count and an ETA as it goes.
    """
    from fedpt.data.records import load_eval_set, source_name
    from fedpt.runner import format_table, write_summary
    from fedpt.server import ServerModels, load_eval_sets, load_splits

    started = time.perf_counter()
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise FedPTError(f"{run_dir} is not a fedpt run directory (no config.toml); give --run the --out of a run")
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        section, _, field = key.partition(".")
        if section != "eval" and not (section == "data" and field in ALLOWED_DATA_KEYS):
            raise FedPTError(f"fedpt eval only takes --set eval.<key>=... or data.{{{','.join(ALLOWED_DATA_KEYS)}}}"
                             f"=... (the models and their training are fixed by the run), got '{item}'")
    cfg = load_config(path=config_path, overrides=list(overrides or []))
    systems = _choose_systems(run_dir, cfg.run.systems, systems)
    plan = _plan(systems, models)
    out_dir = run_dir / "evals" / (name or time.strftime("%Y%m%d-%H%M%S"))
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FedPTError(f"{out_dir} already holds an evaluation; choose another --name")

    splits = load_splits(cfg)
    if data:
        names = [source_name(src) for src in data]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise FedPTError(f"two --data sources share the name {dupes[0]!r} (file stem); rename one")
        eval_sets = {n: load_eval_set(src, cfg.data.eval_sets_size, cfg.data.split_seed, cfg.data.fields)
                     for n, src in zip(names, data)}
    else:
        eval_sets = load_eval_sets(cfg, splits)
    overlap = {}  # prompts the run trained or distilled on: reported, not refused (the user decides)
    for set_name, examples in eval_sets.items():
        keys = {ex.key for ex in examples}
        overlap[set_name] = {"device_data": len(keys & {ex.key for ex in splits.train}),
                             "kd_pool": len(keys & {ex.key for ex in splits.kd_pool}),
                             "held_out": len(keys & {ex.key for ex in splits.eval})}

    out_dir.mkdir(parents=True, exist_ok=True)
    # the large LM gets a torch copy for its adapter only when a tuned large LM (fedavg-large) is to be scored
    large_trainable = any(SYSTEM_SPECS[s].device_model == "large" and any(not m.startswith("pretrained-")
                                                                          for m in plan[s]) for s in systems)
    server = ServerModels.load(cfg, splits, large_trainable=large_trainable)
    server.eval_sets = eval_sets
    records = _evaluate(run_dir, out_dir, server, systems, plan, show_progress)
    cfg.run.systems = systems
    (out_dir / "eval.json").write_text(json.dumps({
        "run": str(run_dir), "data": data or "the run's evaluation sets", "sets": {n: len(e) for n, e in eval_sets.items()},
        "systems": systems, "models": plan, "overrides": overrides or [], "overlap_with_run": overlap}, indent=1))
    cfg.save(out_dir / "config.toml")
    summary = write_summary(out_dir, cfg, records, {n: len(e) for n, e in eval_sets.items()},
                            time.perf_counter() - started, None)
    (out_dir / "table.txt").write_text(format_table(summary) + "\n")
    return out_dir, summary


def _choose_systems(run_dir: Path, ran: list[str], wanted: list[str] | None) -> list[str]:
    for system in wanted or []:
        if system not in SYSTEM_SPECS:
            raise FedPTError(f"unknown system '{system}': choose from {', '.join(SYSTEM_SPECS)}")
        if system not in ran:
            raise FedPTError(f"run {run_dir} has no system '{system}'; it ran: {', '.join(ran)}")
    chosen = list(dict.fromkeys(wanted)) if wanted else list(ran)
    for system in chosen:
        if not (run_dir / system / "adapter" / "adapter_model.safetensors").is_file():
            if wanted:
                raise FedPTError(f"{run_dir / system / 'adapter'} holds no adapter: the run did not finish "
                                 f"system '{system}' (fedpt run --resume {run_dir})")
    finished = [s for s in chosen if (run_dir / s / "adapter" / "adapter_model.safetensors").is_file()]
    if not finished:
        raise FedPTError(f"no system of {run_dir} has a final adapter yet: finish the run first "
                         f"(fedpt run --resume {run_dir})")
    return finished


def _plan(systems: list[str], models: list[str] | None) -> dict[str, list[str]]:
    """{system: models to score}; pretrained models are scored once and filed under every system."""
    for model in models or []:
        if model not in MODELS:
            raise FedPTError(f"unknown --model '{model}': choose from {', '.join(MODELS)}")
    plan = {}
    for system in systems:
        tuned = [m for m in (models or default_models(system)) if not m.startswith("pretrained-")]
        large_device = SYSTEM_SPECS[system].device_model == "large"
        wrong = [m for m in tuned if (m == "large") != large_device]
        if wrong and models:
            raise FedPTError(f"system '{system}' tuned the {'large' if large_device else 'small'} LM: --model "
                             f"{wrong[0]} does not exist for it (use {'large' if large_device else 'small or proxy'})")
        pretrained = [m for m in (models or ["pretrained-small", "pretrained-large"]) if m.startswith("pretrained-")]
        plan[system] = pretrained + [m for m in tuned if m not in wrong]
    return plan


def _evaluate(run_dir: Path, out_dir: Path, server, systems: list[str],
              plan: dict[str, list[str]], show_progress: bool = True) -> list[RoundRecord]:
    """Score every planned model; write predictions and one round-0 and one final record per system."""
    from fedpt.evaluate import decodings, protocol_name
    from fedpt.progress import PromptProgress

    # Pretrained models are scored once and filed under every system.
    pretrained = {m for models in plan.values() for m in models if m.startswith("pretrained-")}
    tuned = sum(1 for models in plan.values() for m in models if not m.startswith("pretrained-"))
    total = (len(pretrained) + tuned) * sum(len(e) for e in server.eval_sets.values()) * len(decodings(server.cfg.eval))
    progress = PromptProgress("fedpt eval", total, protocol_name(server.cfg.eval), enabled=show_progress)
    records: list[RoundRecord] = []
    memo: dict[str, dict] = {}
    try:
        for system in systems:
            records += _evaluate_system(run_dir, out_dir, server, system, plan[system], progress, memo)
    finally:
        progress.close()
    return records


def _evaluate_system(run_dir: Path, out_dir: Path, server, system: str, models: list[str], progress,
                     memo: dict[str, dict]) -> list[RoundRecord]:
    """One system's planned models (pretrained ones from ``memo`` when another system scored them)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpt.predictions import prediction_path, write_predictions
    from fedpt.progress import evaluate_sets

    # Every model in the run's evaluation engine (``tuned_source``), as the run judged it: a run
    # evaluated in llama.cpp is not re-judged in torch.
    def small_base():
        server.load_adapter("small", server.initial_adapter("small"))
        return server.tuned_source("small")

    spec = SYSTEM_SPECS[system]
    first_set = next(iter(server.eval_sets))
    pretrained = RoundRecord(round=0, system=system)
    final = RoundRecord(round=_final_round(run_dir, system), system=system)
    for model in models:
        if model.startswith("pretrained-"):
            if model not in memo:
                source = small_base() if model == "pretrained-small" else server.large_logits()
                memo[model] = evaluate_sets(server, source, model, progress)
            results, record, role = memo[model], pretrained, model.removeprefix("pretrained-")
        else:
            adapter = load_file(run_dir / system / "adapter" / "adapter_model.safetensors")
            set_peft_model_state_dict(server.model(spec.device_model), adapter)
            source = {"small": lambda: server.tuned_source("small"), "proxy": server.proxy_tune,
                      "large": lambda: server.tuned_source("large")}[model]()
            results, record, role = evaluate_sets(server, source, f"{system} {model}", progress), final, model
        for set_name, result in results.items():
            record.rougeL_sets.setdefault(set_name, {})[role] = result.rouge_l
            write_predictions(prediction_path(out_dir, system, record.round, set_name, model), result)
        setattr(record, f"rougeL_{role}", results[first_set].rouge_l)
    return [r for r in (pretrained, final) if r.rougeL_sets]


def _final_round(run_dir: Path, system: str) -> int:
    """The round the system's final adapter comes from (its last record in rounds.jsonl)."""
    from fedpt.metrics import RoundLog

    rounds = [r.round for r in RoundLog(run_dir / "rounds.jsonl").records if r.system == system]
    if not rounds or max(rounds) == 0:
        raise FedPTError(f"{run_dir}/rounds.jsonl has no trained round of '{system}': the run is incomplete")
    return max(rounds)
