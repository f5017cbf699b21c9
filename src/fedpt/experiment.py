"""``fedpt experiment``: the paper's comparison on this machine, resumable.

1. FedAvg-small, FedAvg-large, FedAvg+PT and FedPT with identical data, seeds and budgets (one
   ``fedpt run`` with every system; each system checkpoints every round, so running the same
   command again continues where it stopped);
2. an alpha sweep of the proxy-tuned large LM built from FedPT's (and FedAvg+PT's) final
   adapter (each alpha saved as it finishes);
3. a cost table per system (device parameters, bytes, memory, FLOPs, seconds; server seconds);
4. plots (Rouge-L per round per set, like the paper's Figure 2; Rouge-L vs alpha, Figure 4) and
   ``results.md`` with the tables, the protocol and the command.

Every Rouge-L in ``results.md`` comes with a 95% bootstrap interval over prompts and names the
prediction file it is the mean of (``fedpt.predictions``); the paper's comparisons are paired
bootstrap intervals of the difference (``fedpt.intervals``), and a claim is stated only where
the interval excludes zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedpt.config import SYSTEMS, FedPTConfig, load_config
from fedpt.errors import FedPTError
from fedpt.metrics import RoundLog, RoundRecord
from fedpt.models.loading import resolve_dtype

DEFAULT_ALPHAS = (0.5, 1.0, 1.5, 2.0)
ROLES = {"small": "tuned small", "proxy": "proxy-tuned large", "large": "tuned large"}


def run_experiment(cfg: FedPTConfig, out_dir: Path, alphas: tuple[float, ...] = DEFAULT_ALPHAS,
                   verbose: bool = False, show_progress: bool = True, command: str = "fedpt experiment") -> Path:
    from fedpt.runlock import LOCK_NAME, run_lock
    from fedpt.runner import run

    cfg.run.systems = list(SYSTEMS)
    cfg.validate()
    resume = (out_dir / "config.toml").is_file()
    if resume:
        saved = load_config(path=out_dir / "config.toml")
        if saved.to_dict() != cfg.to_dict():
            raise FedPTError(f"{out_dir} holds an experiment with a different config; resume it with the same "
                             "preset and --set values, or choose another --out")
    elif out_dir.exists() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise FedPTError(f"{out_dir} exists and is not a fedpt experiment; choose another --out")
    with run_lock(out_dir):  # the whole experiment: the runs, the alpha sweep and results.md
        summary = run(cfg, out_dir, verbose=verbose, show_progress=show_progress, resume=resume)
        sweep = alpha_sweep(cfg, out_dir, alphas)
        records = RoundLog(out_dir / "rounds.jsonl").records
        costs = cost_table(cfg, records)
        intervals = round_intervals(out_dir, records)
        plots = make_plots(out_dir, records, sweep, intervals)
        path = out_dir / "results.md"
        path.write_text(results_markdown(cfg, summary, records, sweep, costs, plots, command, intervals, out_dir))
    return path


def round_intervals(out_dir: Path, records: list[RoundRecord]) -> dict[tuple[str, int, str, str], dict]:
    """{(system, round, set, role): 95% interval} for every evaluated record, from its prediction file."""
    from fedpt.intervals import record_intervals

    return {(r.system, r.round, set_name, role): interval
            for r in records
            for set_name, roles in record_intervals(out_dir, r.system, json.loads(r.to_json())).items()
            for role, interval in roles.items()}


def final_rounds(records: list[RoundRecord]) -> dict[str, int]:
    """Each system's last recorded round (earlier than federation.rounds if it met its target)."""
    last: dict[str, int] = {}
    for r in records:
        last[r.system] = max(last.get(r.system, 0), r.round)
    return last


def sweep_file(out_dir: Path, cfg: FedPTConfig, system: str, final_round: int, set_name: str, alpha: float) -> Path:
    """The predictions behind one alpha-sweep value: the run's own alpha is its last round's proxy file."""
    from fedpt.predictions import prediction_path

    model = "proxy" if alpha == cfg.proxy.alpha else f"proxy-alpha{alpha:g}"
    return prediction_path(out_dir, system, final_round, set_name, model)


def alpha_sweep(cfg: FedPTConfig, out_dir: Path, alphas: tuple[float, ...],
                systems: tuple[str, ...] = ("fedpt",)) -> dict:
    """Rouge-L of FedPT's proxy-tuned large LM per alpha (the paper's Figure 4), final adapter.

    The run's own alpha was already scored at the last round: that record (and its prediction
    file) is reused. ``eval.sweep_sets`` / ``eval.sweep_size`` restrict the sweep to some sets
    and to their first prompts (a cheaper sweep); the run's own alpha then reads the same
    prompts from its last round's predictions. Each other alpha writes its own predictions.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpt.predictions import per_prompt_scores, read_predictions, write_predictions
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
    todo = [(system, alpha) for system in systems for alpha in alphas if str(alpha) not in sweep.get(system, {})]
    if not todo:
        return sweep
    server = ServerModels.load(cfg, load_splits(cfg), large_trainable=False)
    server.eval_sets = {name: server.eval_sets[name][:cfg.eval.sweep_size or None] for name in wanted}
    for system, alpha in todo:
        adapter = load_file(out_dir / system / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(server.small, adapter)
        results = server.evaluate(server.proxy_tune(alpha=alpha))
        for name, result in results.items():
            write_predictions(sweep_file(out_dir, cfg, system, last[system], name, alpha), result)
        sweep.setdefault(system, {})[str(alpha)] = {name: r.rouge_l for name, r in results.items()}
        path.write_text(json.dumps(sweep, indent=1))  # saved per alpha: a stop loses at most one
        print(f"alpha sweep: {system} alpha={alpha}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sweep[system][str(alpha)].items()), file=sys.stderr)
    return sweep


def sweep_sets(cfg: FedPTConfig, names: list[str]) -> list[str]:
    """The evaluation sets the alpha sweep covers (``eval.sweep_sets``; empty = all), in run order."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in cfg.eval.sweep_sets if n not in names]
    if unknown:
        raise FedPTError(f"eval.sweep_sets names {', '.join(unknown)}, not an evaluation set of this run "
                         f"({', '.join(names)})")
    return [n for n in names if not cfg.eval.sweep_sets or n in cfg.eval.sweep_sets]


def cost_table(cfg: FedPTConfig, records: list[RoundRecord]) -> list[dict]:
    """Per system, per device per round (means over trained rounds); server seconds per round."""
    from fedpt.models.loading import load_model
    from fedpt.models.lora import attach_lora, count_trainable

    params = {}
    for role, spec in (("small", cfg.model.small), ("large", cfg.model.large)):
        model = attach_lora(load_model(spec, cfg.model.dtype), cfg.lora, seed=0)
        params[role] = (count_trainable(model), sum(p.numel() for p in model.parameters()))
        del model
    from fedpt.systems import SYSTEM_SPECS

    rows = []
    for system in cfg.run.systems:
        trained = [r for r in records if r.system == system and r.round > 0]
        if not trained:
            continue
        role = SYSTEM_SPECS[system].device_model
        mean = lambda key: sum(getattr(r, key) or 0 for r in trained) / len(trained)  # noqa: E731
        tokens = mean("device_train_tokens")
        rows.append({
            "system": system,
            "device_model": role,
            "trainable_params": params[role][0],
            "device_model_params": params[role][1],
            "bytes_up_per_device": mean("bytes_up_per_device"),
            "bytes_down_per_device": mean("bytes_down_per_device"),
            "device_peak_memory_bytes": max(r.device_peak_memory_bytes or 0 for r in trained),
            "device_train_tflops_est": 6 * params[role][1] * tokens / 1e12,
            "device_train_seconds": mean("device_train_seconds"),
            "server_distill_seconds": mean("distill_seconds"),
            "round_seconds": mean("seconds"),
        })
    return rows


def make_plots(out_dir: Path, records: list[RoundRecord], sweep: dict,
               intervals: dict[tuple[str, int, str, str], dict] | None = None) -> list[str]:
    """Rouge-L per round per set (95% intervals as error bars) and Rouge-L vs alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for r in records for s in r.rougeL_sets}, key=lambda s: (s != _first_set(records), s))
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
                    bars = [(intervals or {}).get((system, x, set_name, role if x or role != "proxy" else "large"))
                            for x, y in points]
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
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "rouge_per_round.png", dpi=120)
    plt.close(fig)
    names = ["rouge_per_round.png"]
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for system, by_alpha in sweep.items():
            alphas = sorted(by_alpha, key=float)
            for set_name in sets:
                ax.plot([float(a) for a in alphas], [by_alpha[a].get(set_name) for a in alphas], marker="o",
                        label=f"{system}: {set_name}")
        ax.set_xlabel("alpha")
        ax.set_ylabel("Rouge-L (proxy-tuned large)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "alpha_sweep.png", dpi=120)
        plt.close(fig)
        names.append("alpha_sweep.png")
    return names


def _first_set(records: list[RoundRecord]) -> str:
    return next((next(iter(r.rougeL_sets)) for r in records if r.rougeL_sets), "")


def results_markdown(cfg: FedPTConfig, summary: dict, records: list[RoundRecord], sweep: dict,
                     costs: list[dict], plots: list[str], command: str,
                     intervals: dict[tuple[str, int, str, str], dict] | None = None,
                     out_dir: Path | None = None) -> str:
    from fedpt.intervals import ALL_SETS, NOT_DISTINGUISHABLE
    from fedpt.predictions import model_name, prediction_path
    from fedpt.runner import format_table
    from fedpt.systems import training_groups

    intervals = intervals or {}

    def ci(interval: dict | None) -> str:
        return f"[{interval['low']:.2f}, {interval['high']:.2f}]" if interval else ""

    def relative(path: Path) -> str:
        return str(path.relative_to(out_dir)) if out_dir is not None else path.name

    boot = summary.get("bootstrap", {})
    lines = ["# FedPT experiment results", "",
             f"Command: `{command}`", "",
             f"Models: small `{cfg.model.small}`, large `{cfg.model.large}` ({resolve_dtype(cfg.model.dtype)}); "
             f"{cfg.federation.num_clients} devices, {cfg.federation.clients_per_round} per round, "
             f"{cfg.federation.rounds} rounds; data `{cfg.data.source}` ({cfg.data.partitioner}"
             f"{f', alpha={cfg.data.dirichlet_alpha}' if cfg.data.partitioner == 'dirichlet' else ''}); "
             f"seed {cfg.run.seed}.", "",
             f"Evaluation: {summary['eval_protocol']}; prompt template `{cfg.data.template}`; sets: "
             + ", ".join(f"{name} ({n} prompts)" for name, n in summary.get("eval_sets", {}).items()) + ".", "",
             f"Intervals: 95% {boot.get('method', 'bootstrap')}; {boot.get('samples')} resamples, seed "
             f"{boot.get('seed')} (a rerun gives the same intervals). Every number is the mean of the "
             "`rouge_l` column of the prediction file named next to it (under the run directory).", "",
             "## Rouge-L, pretrained and final", "", "```", format_table(summary), "```", ""]
    if summary.get("comparisons"):
        lines += ["## The paper's comparisons (paired bootstrap on the same prompts)", "",
                  f"A claim is stated only where the 95% interval of the difference excludes zero; otherwise "
                  f"\"{NOT_DISTINGUISHABLE}\". `{ALL_SETS}` pools the prompts of every set.", "",
                  "| comparison | eval set | A | B | Rouge-L A | Rouge-L B | A − B | 95% CI | n | finding |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in summary["comparisons"]:
            lines.append(f"| {row['comparison']} | {row['set']} | {row['a']} | {row['b']} | {row['a_rouge_l']:.2f} | "
                         f"{row['b_rouge_l']:.2f} | {row['diff_estimate']:+.2f} | "
                         f"[{row['diff_low']:+.2f}, {row['diff_high']:+.2f}] | {row['diff_n']} | {row['verdict']} |")
        lines.append("")
    target = cfg.federation.target_rouge_l
    if target:
        lines += [f"Target Rouge-L {target:g} (proxy-tuned large LM, held-out set): " + ", ".join(
            f"{name} {'reached at round ' + str(info['rounds_run']) if (info['target_rouge_l'] or {}).get('reached') else 'not reached'}"
            for name, info in summary["systems"].items() if _has_proxy(name)) + ".", ""]
    lines += ["## Rouge-L per round", "",
              "| system | round | eval set | model | Rouge-L | 95% CI | predictions |", "|---|---|---|---|---|---|---|"]
    for r in records:
        for set_name, roles in r.rougeL_sets.items():  # rounds without evaluation (eval.every) have none
            for role, value in roles.items():
                path = prediction_path(out_dir or Path("."), r.system, r.round, set_name, model_name(role, r.round))
                lines.append(f"| {r.system} | {r.round} | {set_name} | {model_name(role, r.round)} | {value:.2f} | "
                             f"{ci(intervals.get((r.system, r.round, set_name, role)))} | {relative(path)} |")
    if sweep:
        last = final_rounds(records)
        size = f", first {cfg.eval.sweep_size} prompts per set" if cfg.eval.sweep_size else ""
        lines += ["", f"## Alpha sweep (proxy-tuned large LM, final adapter{size})", "",
                  "| system | alpha | eval set | Rouge-L | 95% CI | predictions |", "|---|---|---|---|---|---|"]
        for system, by_alpha in sweep.items():
            for alpha in sorted(by_alpha, key=float):
                for set_name, value in by_alpha[alpha].items():
                    path = sweep_file(out_dir or Path("."), cfg, system, last.get(system, 0), set_name, float(alpha))
                    interval = None
                    if out_dir is not None and path.is_file():
                        from fedpt.predictions import per_prompt_scores, read_predictions
                        from fedpt.stats import bootstrap_ci

                        scores = list(per_prompt_scores(read_predictions(path)).values())
                        interval = bootstrap_ci(scores[:cfg.eval.sweep_size or None]).to_json()
                    lines.append(f"| {system} | {alpha} | {set_name} | {value:.2f} | {ci(interval)} | "
                                 f"{relative(path)} |")
    lines += ["", "## Cost per device per round (means over rounds) and server time", "",
              "| system | device LM | trainable params | bytes up | bytes down | device peak RSS | "
              "device TFLOPs (6·N·tokens) | device train s | server KD s | round s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['system']} | {c['device_model']} | {c['trainable_params']:,} | "
                     f"{c['bytes_up_per_device'] / 2**20:.2f} MiB | {c['bytes_down_per_device'] / 2**20:.2f} MiB | "
                     f"{c['device_peak_memory_bytes'] / 2**30:.2f} GiB | {c['device_train_tflops_est']:.1f} | "
                     f"{c['device_train_seconds']:.1f} | {c['server_distill_seconds']:.1f} | {c['round_seconds']:.1f} |")
    groups = [g for g in training_groups(list(dict.fromkeys(r.system for r in records))) if len(g) > 1]
    if groups:
        lines += ["", "Shared device rounds: " + "; ".join(" and ".join(g) for g in groups)
                  + " train once (same seeds and adapters; only the evaluation differs), so their device costs "
                  "are the same rounds, counted once in the time below."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    # Shared rounds count once: per training group, the longest member's time.
    total = sum(max(sum(r.seconds for r in records if r.system == name) for name in group)
                for group in training_groups(list(dict.fromkeys(r.system for r in records))))
    lines += ["", f"Time in rounds, all systems (sum of `seconds` in rounds.jsonl, evaluation included, shared "
              f"rounds once): {total:.0f} s. Device peak RSS is the device process's lifetime peak (`ru_maxrss`), so a "
              "process that trained the large LM earlier in the same run reports that peak later too."]
    return "\n".join(lines) + "\n"


def _has_proxy(name: str) -> bool:
    from fedpt.systems import SYSTEM_SPECS

    return SYSTEM_SPECS[name].proxy


def _sets(records: list[RoundRecord]) -> list[str]:
    return list(dict.fromkeys(s for r in records for s in r.rougeL_sets))
