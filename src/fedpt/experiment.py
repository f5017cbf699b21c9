"""``fedpt experiment``: the paper's comparison on this machine, resumable.

1. FedAvg-small, FedAvg-large, FedAvg+PT and FedPT with identical data, seeds and budgets (one
   ``fedpt run`` with every system; each system checkpoints every round, so running the same
   command again continues where it stopped);
2. an alpha sweep of the proxy-tuned large LM built from FedPT's (and FedAvg+PT's) final
   adapter (each alpha saved as it finishes);
3. a cost table per system (device parameters, bytes, memory, FLOPs, seconds; server seconds);
4. plots (Rouge-L per round per set, like the paper's Figure 2; Rouge-L vs alpha, Figure 4) and
   ``results.md`` with the tables, the protocol and the command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedpt.config import SYSTEMS, FedPTConfig, load_config
from fedpt.errors import FedPTError
from fedpt.metrics import RoundLog, RoundRecord

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
        plots = make_plots(out_dir, records, sweep)
        path = out_dir / "results.md"
        path.write_text(results_markdown(cfg, summary, records, sweep, costs, plots, command))
    return path


def alpha_sweep(cfg: FedPTConfig, out_dir: Path, alphas: tuple[float, ...],
                systems: tuple[str, ...] = ("fedpt",)) -> dict:
    """Rouge-L of FedPT's proxy-tuned large LM per alpha (the paper's Figure 4), final adapter.

    The run's own alpha was already scored at the last round: that record is reused.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedpt.server import ServerModels, load_splits

    path = out_dir / "alpha_sweep.json"
    sweep: dict = json.loads(path.read_text()) if path.is_file() else {}
    final = {r.system: r for r in RoundLog(out_dir / "rounds.jsonl").records if r.round == cfg.federation.rounds}
    for system in systems:
        if cfg.proxy.alpha in alphas and system in final and final[system].rougeL_sets:
            sweep.setdefault(system, {})[str(cfg.proxy.alpha)] = {
                name: roles["proxy"] for name, roles in final[system].rougeL_sets.items() if "proxy" in roles}
    todo = [(system, alpha) for system in systems for alpha in alphas if str(alpha) not in sweep.get(system, {})]
    if not todo:
        return sweep
    server = ServerModels.load(cfg, load_splits(cfg), large_trainable=False)
    for system, alpha in todo:
        adapter = load_file(out_dir / system / "adapter" / "adapter_model.safetensors")
        set_peft_model_state_dict(server.small, adapter)
        results = server.evaluate(server.proxy_tune(alpha=alpha))
        sweep.setdefault(system, {})[str(alpha)] = {name: r.rouge_l for name, r in results.items()}
        path.write_text(json.dumps(sweep, indent=1))  # saved per alpha: a stop loses at most one
        print(f"alpha sweep: {system} alpha={alpha}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sweep[system][str(alpha)].items()), file=sys.stderr)
    return sweep


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


def make_plots(out_dir: Path, records: list[RoundRecord], sweep: dict) -> list[str]:
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
                    ax.plot(*zip(*points), marker="o", label=f"{system}: {label}")
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
                     costs: list[dict], plots: list[str], command: str) -> str:
    from fedpt.runner import format_table

    lines = ["# FedPT experiment results", "",
             f"Command: `{command}`", "",
             f"Models: small `{cfg.model.small}`, large `{cfg.model.large}` ({cfg.model.dtype}); "
             f"{cfg.federation.num_clients} devices, {cfg.federation.clients_per_round} per round, "
             f"{cfg.federation.rounds} rounds; data `{cfg.data.source}` ({cfg.data.partitioner}"
             f"{f', alpha={cfg.data.dirichlet_alpha}' if cfg.data.partitioner == 'dirichlet' else ''}); "
             f"seed {cfg.run.seed}.", "",
             f"Evaluation: {summary['eval_protocol']}; prompt template `{cfg.data.template}`; sets: "
             + ", ".join(f"{name}" for name in (records[0].rougeL_sets if records else {})) + ".", "",
             "## Rouge-L, pretrained and final", "", "```", format_table(summary), "```", "",
             "## Rouge-L per round", ""]
    lines.append("| system | round | " + " | ".join(f"{s} {role}" for s in _sets(records) for role in ROLES) + " |")
    lines.append("|---|---|" + "---|" * (len(_sets(records)) * len(ROLES)))
    for r in records:
        if not r.rougeL_sets:
            continue  # a round without evaluation (eval.every)
        cells = [f"{r.rougeL_sets.get(s, {}).get(role):.2f}" if role in r.rougeL_sets.get(s, {}) else ""
                 for s in _sets(records) for role in ROLES]
        lines.append(f"| {r.system} | {r.round} | " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", "## Alpha sweep (proxy-tuned large LM, final adapter)", "",
                  "| system | alpha | " + " | ".join(_sets(records)) + " |", "|---|---|" + "---|" * len(_sets(records))]
        for system, by_alpha in sweep.items():
            for alpha in sorted(by_alpha, key=float):
                lines.append(f"| {system} | {alpha} | " + " | ".join(
                    f"{by_alpha[alpha].get(s, float('nan')):.2f}" for s in _sets(records)) + " |")
    lines += ["", "## Cost per device per round (means over rounds) and server time", "",
              "| system | device LM | trainable params | bytes up | bytes down | device peak RSS | "
              "device TFLOPs (6·N·tokens) | device train s | server KD s | round s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['system']} | {c['device_model']} | {c['trainable_params']:,} | "
                     f"{c['bytes_up_per_device'] / 2**20:.2f} MiB | {c['bytes_down_per_device'] / 2**20:.2f} MiB | "
                     f"{c['device_peak_memory_bytes'] / 2**30:.2f} GiB | {c['device_train_tflops_est']:.1f} | "
                     f"{c['device_train_seconds']:.1f} | {c['server_distill_seconds']:.1f} | {c['round_seconds']:.1f} |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    total = sum(r.seconds for r in records)
    lines += ["", f"Time in rounds, all systems (sum of `seconds` in rounds.jsonl, evaluation included): "
              f"{total:.0f} s. Device peak RSS is the device process's lifetime peak (`ru_maxrss`), so a "
              "process that trained the large LM earlier in the same run reports that peak later too."]
    return "\n".join(lines) + "\n"


def _sets(records: list[RoundRecord]) -> list[str]:
    return list(dict.fromkeys(s for r in records for s in r.rougeL_sets))
