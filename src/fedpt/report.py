"""``fedpt report DIR``: an experiment's results, written from the files in its folder alone.

What it reads (no model, no data set, no network; nothing else on the machine):

- ``config.toml``: the experiment's config (every piece ran with it; ``run.systems`` aside);
- ``rounds.jsonl``: per system per round, Rouge-L per set and model, costs, timings;
- ``<system>/predictions/*.jsonl``: every evaluation's outputs. Each Rouge-L, interval and paired
  comparison is recomputed from them (``fedpt.intervals``, ``fedpt.stats``), not copied from a summary;
- ``alpha_sweep.json``: which alphas the sweep covered (the values again from their prediction files);
- ``pieces.json``: which systems each ``fedpt experiment --systems`` invocation ran, on which CPU, in
  which dtype, for how long, with which command; the model sizes for the cost table;
- ``partitions.md`` / ``partitions.png``: the device data's category histogram;
- ``NOTES.md`` (optional): hand-written notes, copied verbatim into a section labelled as such.

What it writes: one Markdown file and its plots (``rouge_per_round.png``, ``alpha_sweep.png``) next
to it. Systems the folder does not have yet get "not yet run" rows. Each comparison gets a verdict
(``fedpt.intervals.direction``: higher / lower / not distinguishable); the paper's central claim
(FedPT's proxy-tuned large LM ~ FedAvg-large) also gets an equivalence verdict with the margin fixed
in ``fedpt.intervals.EQUIVALENCE_MARGIN`` (equivalent / better / worse / undecided).

The text depends on those files only: bootstrap seeds are fixed, there is no date, no absolute
path and nothing about the machine that writes it (links are relative to the output file). PNGs
are written without the plotting library's version, so one environment writes the same bytes;
``tests/test_report.py`` rebuilds ``docs/results.md`` from the committed ``results/paper-cpu/``
and fails on any difference in the Markdown.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fedpt.config import SYSTEMS, FedPTConfig, load_config
from fedpt.errors import FedPTError
from fedpt.intervals import ALL_SETS, CENTRAL_CLAIM, COMPARISONS, EQUIVALENCE_MARGIN
from fedpt.metrics import RoundLog, RoundRecord

PIECES = "pieces.json"
NOTES = "NOTES.md"
SWEEP = "alpha_sweep.json"
ROUGE_PLOT, SWEEP_PLOT = "rouge_per_round.png", "alpha_sweep.png"
ROLES = {"small": "tuned small", "proxy": "proxy-tuned large", "large": "tuned large"}
NOT_YET_RUN = "not yet run"


@dataclass
class Folder:
    """An experiment folder as the report sees it (read once, never written)."""

    path: Path
    cfg: FedPTConfig | None
    records: list[RoundRecord] = field(default_factory=list)
    pieces: list[dict] = field(default_factory=list)
    sweep: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Folder:
        if not path.is_dir():
            raise FedPTError(f"{path} is not a directory: give fedpt report an experiment folder")
        cfg = load_config(path=path / "config.toml") if (path / "config.toml").is_file() else None
        order = {name: i for i, name in enumerate(SYSTEMS)}
        records = sorted(RoundLog(path / "rounds.jsonl").records, key=lambda r: (order.get(r.system, 99), r.round))
        if records and cfg is None:
            raise FedPTError(f"{path} has rounds.jsonl but no config.toml: not an experiment folder")
        pieces = read_pieces(path)
        sweep = json.loads((path / SWEEP).read_text()) if (path / SWEEP).is_file() else {}
        return cls(path, cfg, records, pieces, sweep)

    def ran(self) -> list[str]:
        """Systems with any record, in the experiment's order."""
        return [s for s in SYSTEMS if any(r.system == s for r in self.records)]

    def finished(self) -> list[str]:
        from fedpt.systems import system_finished

        return [s for s in self.ran() if self.cfg is not None and system_finished(self.cfg, s, self.records)]

    def final_rounds(self, systems: list[str] | None = None) -> dict[str, int]:
        return {s: max(r.round for r in self.records if r.system == s) for s in (systems or self.ran())}

    def sets(self) -> list[str]:
        return list(dict.fromkeys(name for r in self.records for name in r.rougeL_sets))


def read_pieces(path: Path) -> list[dict]:
    file = path / PIECES
    if not file.is_file():
        return []
    try:
        pieces = json.loads(file.read_text())
    except ValueError as err:
        raise FedPTError(f"{file} is not valid JSON ({err})") from None
    if not isinstance(pieces, list):
        raise FedPTError(f"{file} must hold a list of pieces")
    return pieces


def round_intervals(run_dir: Path, records: list[RoundRecord]) -> dict[tuple[str, int, str, str], dict]:
    """{(system, round, set, role): 95% interval} for every evaluated record, from its prediction file."""
    from fedpt.intervals import record_intervals

    return {(r.system, r.round, set_name, role): interval
            for r in records
            for set_name, roles in record_intervals(run_dir, r.system, json.loads(r.to_json())).items()
            for role, interval in roles.items()}


AGGREGATED = ":aggregated"  # alpha_sweep.json key suffix: the proxy steered by the pre-distillation adapter


def sweep_key(key: str) -> tuple[str, bool]:
    """An ``alpha_sweep.json`` key as (its system, whether it is the pre-distillation expert)."""
    system, aggregated, _ = key.partition(AGGREGATED)
    return system, bool(aggregated)


def ordered_sweep_keys(keys) -> list[str]:
    """``keys`` in the experiment's order: each system, then its pre-distillation expert."""
    keys = set(keys)
    return [key for system in SYSTEMS for key in (system, system + AGGREGATED) if key in keys]


def sweep_file(out_dir: Path, cfg: FedPTConfig, system: str, final_round: int, set_name: str, alpha: float) -> Path:
    """The predictions behind one alpha-sweep value: the run's own alpha is its last round's proxy file.

    ``system`` may carry ``AGGREGATED`` (``fedpt:aggregated``): the proxy-tuned large LM whose small
    expert is the last round's FedAvg'd adapter before distillation, not the distilled one.
    """
    from fedpt.predictions import prediction_path

    system, aggregated = sweep_key(system)
    if aggregated:
        model = f"proxy-aggregated-alpha{alpha:g}"
    else:
        model = "proxy" if alpha == cfg.proxy.alpha else f"proxy-alpha{alpha:g}"
    return prediction_path(out_dir, system, final_round, set_name, model)


def sweep_values(folder: Folder) -> list[dict]:
    """Every alpha-sweep value, recomputed from its prediction file (first ``eval.sweep_size`` prompts)."""
    from fedpt.predictions import per_prompt_scores, read_predictions
    from fedpt.stats import bootstrap_ci

    rows = []
    last = folder.final_rounds()
    for system in sweep_keys(folder):
        by_alpha = folder.sweep[system]
        for alpha in sorted(by_alpha, key=float):
            for set_name in by_alpha[alpha]:
                path = sweep_file(folder.path, folder.cfg, system, last[sweep_key(system)[0]], set_name, float(alpha))
                row = {"system": system, "alpha": alpha, "set": set_name, "path": path, "value": None, "ci": None,
                       "scores": None}
                if path.is_file():
                    scores = per_prompt_scores(read_predictions(path))
                    scores = dict(list(scores.items())[:folder.cfg.eval.sweep_size or None])
                    row["value"] = sum(scores.values()) / len(scores)
                    row["ci"] = bootstrap_ci(list(scores.values())).to_json()
                    row["scores"] = scores
                rows.append(row)
    return rows


def sweep_keys(folder: Folder) -> list[str]:
    """The swept models in ``alpha_sweep.json`` whose system finished: each system, then its
    pre-distillation expert (``fedpt:aggregated``)."""
    last = folder.final_rounds()
    return [key for key in ordered_sweep_keys(folder.sweep) if sweep_key(key)[0] in last]


def sweep_label(key: str) -> str:
    system, aggregated = sweep_key(key)
    if aggregated:
        return f"{system}, pre-distillation expert"
    return f"{system}, distilled expert" if system == "fedpt" else system


def expert_rows(sweep: list[dict]) -> list[dict]:
    """Per system with both experts and per alpha both have: the paired difference pre-distillation
    minus distilled expert, pooled over the swept sets (the prompts both were scored on)."""
    from fedpt.intervals import verdict
    from fedpt.stats import paired_bootstrap_diff

    pooled: dict[tuple[str, str], dict[str, float]] = {}
    for row in sweep:
        if row["scores"] is not None:
            into = pooled.setdefault((row["system"], row["alpha"]), {})
            into |= {f"{row['set']}/{pid}": v for pid, v in row["scores"].items()}
    out = []
    for (key, alpha), scores in pooled.items():
        system, aggregated = sweep_key(key)
        distilled = pooled.get((system, alpha))
        if not aggregated or distilled is None or distilled.keys() != scores.keys():
            continue
        diff = paired_bootstrap_diff(scores, distilled)
        out.append({"system": system, "alpha": alpha, "n": len(scores),
                    "aggregated": sum(scores.values()) / len(scores),
                    "distilled": sum(distilled.values()) / len(distilled), "diff": diff.to_json(),
                    "verdict": verdict(diff, "pre-distillation expert", "distilled expert")})
    return sorted(out, key=lambda r: (r["system"], float(r["alpha"])))


# What the pre-distillation expert's proxy is held against: the final models a user could ship
# instead (FedPT's own product and by-product, the large LM untouched, and the baselines).
EXPERT_REFERENCES: tuple[tuple[str, str, str], ...] = (
    ("fedpt", "proxy", "FedPT's proxy (distilled expert)"),
    ("fedpt", "pretrained-large", "pretrained large"),
    ("fedpt", "small", "FedPT's distilled small"),
    ("fedavg-large", "large", "FedAvg-large"),
    ("fedavg-pt", "proxy", "FedAvg+PT proxy"),
)


def expert_comparisons(folder: Folder, sweep: list[dict]) -> list[dict]:
    """The pre-distillation expert's proxy at the run's own alpha (fixed before the run: picking the
    sweep's best alpha afterwards would flatter it) against each reference model that finished,
    paired on the swept prompts of every set and pooled over them."""
    from fedpt.intervals import side_scores, verdict
    from fedpt.stats import paired_bootstrap_diff

    if folder.cfg is None:
        return []
    alpha = str(float(folder.cfg.proxy.alpha))
    last = folder.final_rounds(folder.finished())
    out = []
    for key in dict.fromkeys(row["system"] for row in sweep):
        system, aggregated = sweep_key(key)
        rows = [r for r in sweep if r["system"] == key and str(float(r["alpha"])) == alpha and r["scores"]]
        if not aggregated or not rows or system not in last:
            continue
        ours = {f"{r['set']}/{pid}": v for r in rows for pid, v in r["scores"].items()}
        for ref_system, model, label in EXPERT_REFERENCES:
            if ref_system not in last:
                continue
            theirs: dict[str, float] = {}
            for r in rows:
                scores = side_scores(folder.path, ref_system, model, last[ref_system], r["set"]) or {}
                theirs |= {f"{r['set']}/{pid}": scores[pid] for pid in r["scores"] if pid in scores}
            if theirs.keys() != ours.keys():
                continue  # a reference without every swept prompt is not compared
            diff = paired_bootstrap_diff(ours, theirs)
            out.append({"system": system, "alpha": alpha, "reference": label, "n": len(ours),
                        "ours": sum(ours.values()) / len(ours), "theirs": sum(theirs.values()) / len(theirs),
                        "diff": diff.to_json(), "verdict": verdict(diff, "pre-distillation proxy", label)})
    return out


def headline_summary(folder: Folder) -> dict:
    """What ``fedpt.runner.format_table`` prints, computed from the folder's records and predictions."""
    from fedpt.evaluate import protocol_name
    from fedpt.intervals import record_intervals
    from fedpt.runner import _privacy_summary
    from fedpt.systems import SYSTEM_SPECS, target_met

    cfg = folder.cfg
    if cfg is None:
        return {"systems": {}}
    systems = {}
    for name in folder.ran():
        rows = [r for r in folder.records if r.system == name]
        final = max(rows, key=lambda r: r.round)
        pretrained = next((r for r in rows if r.round == 0), None)
        target = cfg.federation.target_rouge_l
        systems[name] = {
            "description": SYSTEM_SPECS[name].summary,
            "final": final.__dict__, "pretrained": pretrained.__dict__ if pretrained else None,
            "ci": {"pretrained": record_intervals(folder.path, name, pretrained.__dict__ if pretrained else None),
                   "final": record_intervals(folder.path, name, final.__dict__)},
            "rounds_run": final.round,
            "device_rounds": {"trained": sum(r.clients for r in rows if r.round > 0),
                              "lost": sum(r.failures for r in rows if r.round > 0),
                              "why": [f"round {r.round}: {p}" for r in rows if r.round > 0 for p in r.problems]},
            "target_rouge_l": {"target": target or None,
                               "reached": target_met(cfg, name, [r.__dict__ for r in rows]) if target else None},
        }
    return {"systems": systems, "rounds": cfg.federation.rounds, "eval_protocol": protocol_name(cfg.eval),
            "comparisons": [], "privacy": _privacy_summary(cfg, systems)}


def model_params(pieces: list[dict]) -> dict[str, list[int]]:
    """{role: [trainable (LoRA) parameters, all parameters]} as the pieces recorded them (the last wins)."""
    params: dict[str, list[int]] = {}
    for piece in pieces:
        params |= piece.get("params") or {}
    return params


def cost_rows(folder: Folder) -> list[dict]:
    """Per system, per device per round (means over trained rounds); server seconds per round."""
    from fedpt.systems import SYSTEM_SPECS

    params = model_params(folder.pieces)
    rows = []
    for system in folder.ran():
        trained = [r for r in folder.records if r.system == system and r.round > 0]
        if not trained:
            continue
        role = SYSTEM_SPECS[system].device_model
        mean = lambda key: sum(getattr(r, key) or 0 for r in trained) / len(trained)  # noqa: E731
        trainable, total = params.get(role) or (None, None)
        rows.append({
            "system": system, "device_model": role, "trainable_params": trainable, "device_model_params": total,
            "bytes_up_per_device": mean("bytes_up_per_device"), "bytes_down_per_device": mean("bytes_down_per_device"),
            "device_peak_memory_bytes": max(r.device_peak_memory_bytes or 0 for r in trained),
            "device_train_tflops_est": (6 * total * mean("device_train_tokens") / 1e12) if total else None,
            "device_train_seconds": mean("device_train_seconds"), "server_distill_seconds": mean("distill_seconds"),
            "round_seconds": mean("seconds"),
        })
    return rows


def comparison_rows(folder: Folder) -> tuple[list[dict], list[dict]]:
    """The paper's comparisons between finished systems (per set and pooled), each with its verdicts;
    and the comparisons that cannot be made yet, with the systems they still need."""
    from fedpt.intervals import comparisons, direction, equivalence
    from fedpt.stats import Interval

    finished = folder.finished()
    rows = comparisons(folder.path, folder.final_rounds(finished), folder.sets()) if finished else []
    pooled = pooled_set(folder)
    for row in rows:
        diff = Interval(row["diff_estimate"], row["diff_low"], row["diff_high"], row["diff_n"])
        row["direction"] = direction(diff)
        row["equivalence"] = equivalence(diff) if row["comparison"] == CENTRAL_CLAIM and row["set"] == pooled else None
    made = {row["comparison"] for row in rows}
    ran = folder.ran()
    missing = [{"comparison": label, "a": " ".join(a), "b": " ".join(b),
                "needs": [f"{s} (unfinished)" if s in ran else s for s in dict.fromkeys((a[0], b[0]))
                          if s not in finished]}
               for label, a, b in COMPARISONS if label not in made]
    return rows, missing


def pooled_set(folder: Folder) -> str | None:
    """The rows the verdicts are about: pooled over every set (one set: that set)."""
    sets = folder.sets()
    return ALL_SETS if len(sets) > 1 else (sets[0] if sets else None)


def render(folder_path: Path, out: Path) -> tuple[str, list[str]]:
    """(the report's Markdown, the plot files it shows) for ``folder_path``, as if written to ``out``.

    ``out`` only decides the links (relative to its directory); nothing is written.
    """
    folder = Folder.read(folder_path)
    base = out.parent

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, base)).as_posix()

    lines = [f"# FedPT experiment: {folder.path.name}", "",
             f"Written by `fedpt report` from the files in [`{link(folder.path)}`]({link(folder.path)}) alone "
             "(config, rounds.jsonl, pieces.json, alpha_sweep.json, partitions and every prediction file): "
             "do not edit it by hand. Every Rouge-L is the mean of the `rouge_l` column of the prediction file "
             "named next to it, and every interval and comparison is recomputed from those files.", ""]
    ran, finished = folder.ran(), folder.finished()
    status = [f"{s}: {'finished' if s in finished else (NOT_YET_RUN if s not in ran else 'unfinished')}"
              for s in SYSTEMS]
    lines += ["Systems: " + "; ".join(status) + ".", ""]
    lines += _setup(folder)
    lines += _pieces(folder)
    intervals = round_intervals(folder.path, folder.records)
    summary = headline_summary(folder)
    rows, missing = comparison_rows(folder)
    lines += ["## Rouge-L, pretrained and final", "", "```", format_headline(summary), "```", ""]
    lines += _verdicts(folder, rows, missing)
    lines += _comparisons(rows, missing)
    lines += _per_round(folder, intervals, link)
    sweep = sweep_values(folder)
    lines += _sweep(folder, sweep, link)
    lines += _costs(folder)
    lines += _partitions(folder, link)
    plots = plot_names(folder, sweep)
    if plots:
        lines += ["## Plots", "", "Rouge-L per round per set (95% intervals as error bars); Rouge-L against alpha.",
                  ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += _notes(folder, link)
    return "\n".join(lines).rstrip("\n") + "\n", plots


def format_headline(summary: dict) -> str:
    from fedpt.runner import format_table

    table = format_table(summary) if summary["systems"] else "(no system has run yet)"
    missing = [s for s in SYSTEMS if s not in summary["systems"]]
    return table + "".join(f"\n{name:<14}{'':<16}{NOT_YET_RUN}" for name in missing)


def _setup(folder: Folder) -> list[str]:
    from fedpt.data.records import source_name
    from fedpt.evaluate import protocol_name
    from fedpt.intervals import BOOTSTRAP

    cfg = folder.cfg
    if cfg is None:
        return ["## Setup", "", "No config.toml yet: the first piece exported here brings the experiment's config, "
                "and every later piece must have the same (`fedpt export` refuses another).", ""]
    fed, data, train, distill = cfg.federation, cfg.data, cfg.train, cfg.distill
    dtypes = sorted({p["dtype"] for p in folder.pieces if p.get("dtype")})
    dtype = ", ".join(dtypes) if dtypes else f"model.dtype = {cfg.model.dtype}"
    sizes = _set_sizes(folder)
    configured = [(source_name(data.source), data.eval_size)] + [(source_name(s), data.eval_sets_size)
                                                                  for s in data.eval_sets]
    sets = ", ".join(f"{name} ({sizes[name]} prompts)" if name in sizes else f"{name} (up to {n or 'all'} prompts)"
                     for name, n in configured)
    split = f"{data.partitioner}" + (f", alpha={data.dirichlet_alpha}" if data.partitioner == "dirichlet" else "")
    return [
        "## Setup", "",
        f"Models: small `{cfg.model.small}`, large `{cfg.model.large}` ({dtype}); LoRA rank {cfg.lora.rank}, "
        f"alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.targets)}.", "",
        f"Federation: {fed.num_clients} devices, {fed.clients_per_round} per round, {fed.rounds} rounds; "
        f"{train.steps} steps of batch {train.batch_size} per device per round (lr {train.lr:g}); data "
        f"`{data.source}` ({split}, split seed {data.split_seed}); FedPT distils on {data.kd_pool_size} server "
        f"prompts, {distill.steps} steps of batch {distill.batch_size}; proxy alpha {cfg.proxy.alpha:g}; "
        f"seed {cfg.run.seed}.", "",
        f"Evaluation: {protocol_name(cfg.eval)}; prompt template `{data.template}`; sets: {sets}.", "",
        f"Intervals: 95% percentile bootstrap over prompts, {BOOTSTRAP['samples']} resamples, seed "
        f"{BOOTSTRAP['seed']} (a rerun gives the same intervals); comparisons are paired (per-prompt differences "
        f"on the same prompt ids). Equivalence margin of the central claim (FedPT vs FedAvg-large, pooled over "
        f"all sets), fixed before the run: ±{EQUIVALENCE_MARGIN:g} Rouge-L.", ""]


def _set_sizes(folder: Folder) -> dict[str, int]:
    from fedpt.predictions import model_name, per_prompt_scores, prediction_path, read_predictions

    sizes: dict[str, int] = {}
    for r in folder.records:
        for set_name, roles in r.rougeL_sets.items():
            if set_name in sizes:
                continue
            for role in roles:
                path = prediction_path(folder.path, r.system, r.round, set_name, model_name(role, r.round))
                if path.is_file():
                    sizes[set_name] = len(per_prompt_scores(read_predictions(path)))
                    break
    return sizes


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"


def _pieces(folder: Folder) -> list[str]:
    """Who ran what, where and how long: one row per set of systems run together."""
    lines = ["## Pieces: what ran where", "",
             "Each piece is one `fedpt experiment --systems ...` run into the folder (rerun to resume: a stopped "
             "invocation is listed but not timed). Wall time: the finished invocations' own clocks, the alpha "
             "sweep and model loading included.", "",
             "| systems | invocations | wall time | CPU | cores | dtype | peak memory | finished (UTC) | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, ...], list[dict]] = {}
    for piece in folder.pieces:
        groups.setdefault(tuple(piece.get("systems", [])), []).append(piece)
    if folder.ran() and not folder.pieces:
        lines.append(f"| {', '.join(folder.ran())} | not recorded (no {PIECES}) | | | | | | | |")
    for systems, runs in groups.items():
        done = [p for p in runs if p.get("finished")]
        stopped = len(runs) - len(done)
        count = f"{len(done)} finished" + (f", {stopped} stopped" if stopped else "")
        wall = _duration(sum(p.get("wall_seconds") or 0 for p in done)) if done else "-"
        cpus = "; ".join(dict.fromkeys(p.get("cpu", "?") for p in runs))
        cores = ", ".join(dict.fromkeys(str(p.get("cores", "?")) for p in runs))
        dtypes = ", ".join(dict.fromkeys(p.get("dtype", "?") for p in runs))
        peak = max((p.get("peak_memory_bytes") or 0 for p in done), default=0)
        last = runs[-1]
        lines.append(f"| {', '.join(systems)} | {count} | {wall} | {_cell(cpus)} | {cores} | {dtypes} | "
                     f"{f'{peak / 2**30:.2f} GiB' if peak else '-'} | {(done[-1]['finished'] if done else '-')} | "
                     f"`{_cell(last.get('command', '?'))}` |")
    covered = {s for p in folder.pieces for s in p.get("systems", [])} | set(folder.ran())
    lines += [f"| {s} | {NOT_YET_RUN} | | | | | | | |" for s in SYSTEMS if s not in covered]
    dtypes = {p["dtype"] for p in folder.pieces if p.get("dtype")}
    if len(dtypes) > 1:
        lines += ["", f"The pieces ran in different dtypes ({', '.join(sorted(dtypes))}): comparisons between "
                      "systems of different pieces mix numerics as well as methods."]
    return lines + [""]


def _verdicts(folder: Folder, rows: list[dict], missing: list[dict]) -> list[str]:
    sets = folder.sets()
    pooled = pooled_set(folder)
    by_label = {row["comparison"]: row for row in rows if row["set"] == pooled}
    needs = {m["comparison"]: m["needs"] for m in missing}
    scope = "pooled over all sets" if len(sets) > 1 else f"on {pooled}" if pooled else ""
    lines = [f"## Verdicts ({scope})" if scope else "## Verdicts", "",
             "A is *higher* or *lower* than B only where the 95% paired interval of A − B excludes zero, else "
             f"*not distinguishable*. The central claim is judged against the margin ±{EQUIVALENCE_MARGIN:g}: "
             "*equivalent* if the whole interval lies inside it, *better* / *worse* if it lies wholly above / "
             "below it, else *undecided*.", ""]
    for label, _, _ in COMPARISONS:
        row = by_label.get(label)
        if row is None:
            need = needs.get(label) or []
            why = f"{NOT_YET_RUN} (needs {', '.join(need)})" if need else "no prediction files to compare"
            lines.append(f"- **{label}**: {why}.")
            continue
        text = (f"- **{label}** ({row['a']} − {row['b']}, {row['diff_n']} prompts): {row['diff_estimate']:+.2f}, "
                f"95% CI [{row['diff_low']:+.2f}, {row['diff_high']:+.2f}]: **{row['direction']}**")
        if row["equivalence"]:
            text += f"; equivalence within ±{EQUIVALENCE_MARGIN:g}: **{row['equivalence']}**"
        lines.append(text + ".")
    return lines + [""]


def _comparisons(rows: list[dict], missing: list[dict]) -> list[str]:
    lines = ["## The paper's comparisons (paired bootstrap on the same prompts)", "",
             f"Per set and pooled (`{ALL_SETS}`: the prompts of every set together). A vs B: the verdict on A − B; "
             f"equivalence (±{EQUIVALENCE_MARGIN:g}) only for the central claim, pooled.", "",
             "| comparison | eval set | A | B | Rouge-L A | Rouge-L B | A − B | 95% CI | n | A vs B | "
             f"equivalence (±{EQUIVALENCE_MARGIN:g}) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['comparison']} | {row['set']} | {row['a']} | {row['b']} | {row['a_rouge_l']:.2f} | "
                     f"{row['b_rouge_l']:.2f} | {row['diff_estimate']:+.2f} | "
                     f"[{row['diff_low']:+.2f}, {row['diff_high']:+.2f}] | {row['diff_n']} | {row['direction']} | "
                     f"{row['equivalence'] or ''} |")
    for m in missing:
        reason = f"{NOT_YET_RUN} (needs {', '.join(m['needs'])})" if m["needs"] else "no prediction files"
        lines.append(f"| {m['comparison']} | - | {m['a']} | {m['b']} | {reason} | | | | | | |")
    return lines + [""]


def _per_round(folder: Folder, intervals: dict, link) -> list[str]:
    from fedpt.predictions import model_name, prediction_path

    def ci(interval: dict | None) -> str:
        return f"[{interval['low']:.2f}, {interval['high']:.2f}]" if interval else ""

    lines = ["## Rouge-L per round", "",
             "| system | round | eval set | model | Rouge-L | 95% CI | predictions |", "|---|---|---|---|---|---|---|"]
    for r in folder.records:
        for set_name, roles in r.rougeL_sets.items():  # rounds without evaluation (eval.every) have none
            for role, value in roles.items():
                path = prediction_path(folder.path, r.system, r.round, set_name, model_name(role, r.round))
                lines.append(f"| {r.system} | {r.round} | {set_name} | {model_name(role, r.round)} | {value:.2f} | "
                             f"{ci(intervals.get((r.system, r.round, set_name, role)))} | {link(path)} |")
    lines += [f"| {s} | {NOT_YET_RUN} | | | | | |" for s in SYSTEMS if s not in folder.ran()]
    return lines + [""]


def _sweep(folder: Folder, sweep: list[dict], link) -> list[str]:
    cfg = folder.cfg
    size = f", first {cfg.eval.sweep_size} prompts per set" if cfg is not None and cfg.eval.sweep_size else ""
    lines = [f"## Alpha sweep (proxy-tuned large LM, final adapter{size})", ""]
    if not sweep:
        return lines + [f"{NOT_YET_RUN} (the sweep runs in the piece that runs fedpt)", ""]
    lines += ["| system | alpha | eval set | Rouge-L | 95% CI | predictions |", "|---|---|---|---|---|---|"]
    for row in sweep:
        value = f"{row['value']:.2f}" if row["value"] is not None else "predictions missing"
        ci = f"[{row['ci']['low']:.2f}, {row['ci']['high']:.2f}]" if row["ci"] else ""
        lines.append(f"| {sweep_label(row['system'])} | {row['alpha']} | {row['set']} | {value} | {ci} | "
                     f"{link(row['path'])} |")
    experts, against = expert_rows(sweep), expert_comparisons(folder, sweep)
    if experts or against:
        lines += ["", "### Which expert should steer the large LM", "",
                  "FedPT's distilled small LM already carries what the proxy-tuned large LM taught it, so "
                  "steering the large LM with it may count the large LM twice; the pre-distillation expert is "
                  "the last round's FedAvg'd adapter, what step 4 steered with."]
    if experts:
        lines += ["", "Paired over the swept prompts of every set (95% bootstrap interval of pre-distillation "
                  "minus distilled):", "",
                  "| system | alpha | prompts | pre-distillation | distilled | difference [95% CI] | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in experts:
            d = r["diff"]
            lines.append(f"| {r['system']} | {r['alpha']} | {r['n']} | {r['aggregated']:.2f} | {r['distilled']:.2f} | "
                         f"{d['estimate']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | {r['verdict']} |")
    if against:
        lines += ["", f"The pre-distillation expert's proxy at the run's own alpha ({against[0]['alpha']}, fixed "
                  "before the run) against the final models, paired on the same swept prompts of every set "
                  "(95% bootstrap interval of pre-distillation proxy minus the model named):", "",
                  "| system | compared with | prompts | pre-distillation proxy | that model | difference [95% CI] | "
                  "verdict |", "|---|---|---|---|---|---|---|"]
        for r in against:
            d = r["diff"]
            lines.append(f"| {r['system']} | {r['reference']} | {r['n']} | {r['ours']:.2f} | {r['theirs']:.2f} | "
                         f"{d['estimate']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | {r['verdict']} |")
    return lines + [""]


def _costs(folder: Folder) -> list[str]:
    from fedpt.systems import training_groups

    lines = ["## Cost per device per round (means over rounds) and server time", "",
             "| system | device LM | trainable params | bytes up | bytes down | device peak RSS | "
             "device TFLOPs (6·N·tokens) | device train s | server KD s | round s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = cost_rows(folder)
    for c in rows:
        params = f"{c['trainable_params']:,}" if c["trainable_params"] is not None else "?"
        flops = f"{c['device_train_tflops_est']:.1f}" if c["device_train_tflops_est"] is not None else "?"
        lines.append(f"| {c['system']} | {c['device_model']} | {params} | "
                     f"{c['bytes_up_per_device'] / 2**20:.2f} MiB | {c['bytes_down_per_device'] / 2**20:.2f} MiB | "
                     f"{c['device_peak_memory_bytes'] / 2**30:.2f} GiB | {flops} | "
                     f"{c['device_train_seconds']:.1f} | {c['server_distill_seconds']:.1f} | "
                     f"{c['round_seconds']:.1f} |")
    done = {c["system"] for c in rows}
    lines += [f"| {s} | {NOT_YET_RUN} | | | | | | | | |" for s in SYSTEMS if s not in done]
    ran = folder.ran()
    groups = [g for g in training_groups(ran) if len(g) > 1]
    if groups:
        lines += ["", "Shared device rounds: " + "; ".join(" and ".join(g) for g in groups)
                  + " train once (same seeds and adapters; only the evaluation differs), so their device costs "
                  "are the same rounds, counted once in the time below."]
    if ran:
        # Shared rounds count once: per training group, the longest member's time.
        total = sum(max(sum(r.seconds for r in folder.records if r.system == name) for name in group)
                    for group in training_groups(ran))
        lines += ["", f"Time in rounds, all systems run (sum of `seconds` in rounds.jsonl, evaluation included, "
                      f"shared rounds once): {total:.0f} s. Device peak RSS is the device process's lifetime peak "
                      "(`ru_maxrss`), so a process that trained the large LM earlier in the same piece reports "
                      "that peak later too. Trainable and total parameters come from pieces.json (counted when "
                      "the piece ran)."]
    return lines + [""]


def _partitions(folder: Folder, link) -> list[str]:
    table = folder.path / "partitions.md"
    if not table.is_file():
        return []
    lines = ["## Device data (per-client category histogram)", "", table.read_text().rstrip("\n"), ""]
    if (folder.path / "partitions.png").is_file():
        lines += [f"![partitions]({link(folder.path / 'partitions.png')})", ""]
    return lines


def _notes(folder: Folder, link) -> list[str]:
    notes = folder.path / NOTES
    if not notes.is_file():
        return []
    return [f"## Notes (hand-written, copied verbatim from [`{link(notes)}`]({link(notes)}))", "",
            notes.read_text().rstrip("\n"), ""]


def plot_names(folder: Folder, sweep: list[dict]) -> list[str]:
    """The plots the report shows: per round when anything was evaluated, alpha when the sweep has values."""
    names = []
    if any(r.rougeL_sets for r in folder.records):
        names.append(ROUGE_PLOT)
    if any(row["value"] is not None for row in sweep):
        names.append(SWEEP_PLOT)
    return names


def write_report(folder_path: Path, out: Path | None = None, plots: bool = True) -> Path:
    """Write the report to ``out`` (default ``<folder>/results.md``) and its plots next to it."""
    out = out or folder_path / "results.md"
    text, names = render(folder_path, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if plots and names:
        folder = Folder.read(folder_path)
        make_plots(out.parent, folder, sweep_values(folder), round_intervals(folder.path, folder.records), names)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def check_report(folder_path: Path, out: Path) -> bool:
    """Does ``out`` hold exactly what the report of ``folder_path`` would write there?"""
    return out.is_file() and out.read_text() == render(folder_path, out)[0]


def make_plots(out_dir: Path, folder: Folder, sweep: list[dict], intervals: dict, names: list[str]) -> None:
    """Rouge-L per round per set (95% intervals as error bars) and Rouge-L vs alpha; no software version in
    the PNGs, so the same files give the same bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = folder.records
    metadata = {"Software": None}
    first = next((next(iter(r.rougeL_sets)) for r in records if r.rougeL_sets), "")
    sets = sorted({s for r in records for s in r.rougeL_sets}, key=lambda s: (s != first, s))
    if ROUGE_PLOT in names:
        fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
        for ax, set_name in zip(axes[0], sets):
            for system in dict.fromkeys(r.system for r in records):
                for role, label in ROLES.items():
                    # At round 0 the proxy-tuned large LM is the large LM itself (identity adapter).
                    points = [(r.round, scores.get(role, scores.get("large") if role == "proxy" and r.round == 0
                                                   else None))
                              for r in records if r.system == system
                              for scores in [r.rougeL_sets.get(set_name, {})]]
                    points = [(x, y) for x, y in points if y is not None]
                    if len(points) > 1:
                        bars = [intervals.get((system, x, set_name, role if x or role != "proxy" else "large"))
                                for x, _ in points]
                        errors = None
                        if all(bars):
                            errors = [[y - b["low"] for (_, y), b in zip(points, bars)],
                                      [b["high"] - y for (_, y), b in zip(points, bars)]]
                        ax.errorbar(*zip(*points), yerr=errors, marker="o", capsize=3, label=f"{system}: {label}")
            ax.set_title(set_name)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel("round")
            ax.set_ylabel("Rouge-L")
            ax.grid(alpha=0.3)
        if axes[0][0].get_legend_handles_labels()[0]:
            axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / ROUGE_PLOT, dpi=120, metadata=metadata)
        plt.close(fig)
    if SWEEP_PLOT in names:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system in dict.fromkeys(row["system"] for row in sweep):
            for set_name in dict.fromkeys(row["set"] for row in sweep if row["system"] == system):
                points = [(float(row["alpha"]), row["value"]) for row in sweep
                          if row["system"] == system and row["set"] == set_name and row["value"] is not None]
                ax.plot(*zip(*points), marker="o", linestyle="--" if sweep_key(system)[1] else "-",
                        label=f"{sweep_label(system)}: {set_name}")
        ax.set_xlabel("alpha")
        ax.set_ylabel("Rouge-L (proxy-tuned large)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / SWEEP_PLOT, dpi=120, metadata=metadata)
        plt.close(fig)
