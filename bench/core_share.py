"""Uneven devices on two cores: the one still training takes the finished one's core, or not.

    python bench/core_share.py [--short 1] [--long 2] [--repeats 2] [--out bench/results/core_share]

A simulated round waits for its slowest device process; when the others have finished, their
cores sit idle unless the one still training takes them (``fedpt.federation.core_share``, on by
default in ``fedpt run``). This measures it on the device's own steps: two fresh one-thread
processes (as Ray's actors) start together on uneven work — ``--short`` packed device steps of
the qwen-cpu preset against ``--long`` (the same steps, repeated: the longer one then runs alone
for exactly its extra steps) — with core sharing off and on, alternating over
``--repeats`` rounds. Each case's seconds run from the moment both processes are ready to the
moment both are done (what a round waits). The steps' losses of both cases are compared bit for
bit: sharing changes the thread count mid-step, and this says whether that changes the numbers on
this CPU. Prints a Markdown table with the CPU; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from device_threads import device_stepper  # noqa: E402  (bench/ is not a package)


def child(batches: list[int], folder: str) -> dict:
    """One device process: get ready, wait for "go", run its steps (sharing cores if ``folder``)."""
    import torch

    from fedpt.federation.core_share import CoreShare, governed_threads

    model, rows_of, step = device_stepper()
    share = CoreShare(Path(folder), 2) if folder else None
    print("ready", flush=True)
    sys.stdin.readline()
    steps = []
    with (share.busy() if share else nullcontext()), governed_threads(model, share) as governor:
        for b in batches:
            started = time.perf_counter()
            loss = step(rows_of(b))
            steps.append({"batch": b, "loss": loss, "seconds": time.perf_counter() - started,
                          "threads_after": torch.get_num_threads()})
    return {"steps": steps, "thread_changes": governor.changes if governor else []}


def run_case(short: list[int], long: list[int], share: bool) -> dict:
    folder = tempfile.mkdtemp(prefix="fedpt-bench-cores-") if share else ""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as a Ray device actor
    procs = [subprocess.Popen([sys.executable, __file__, "--child", ",".join(map(str, work)), "--folder", folder],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for work in (short, long)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise SystemExit("a device process failed before its steps (run it alone to see why)")
    started = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results, done = [], []
    for p in procs:
        out, _ = p.communicate()
        done.append(time.perf_counter() - started)
        if p.returncode != 0:
            raise SystemExit("a device process failed during its steps")
        results.append(json.loads(out.strip().splitlines()[-1]))
    if folder:
        os.rmdir(folder)
    return {"share": share, "seconds": max(done), "processes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=1, help="steps of the device that finishes first")
    parser.add_argument("--long", type=int, default=2, help="steps of the other")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/core_share"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child([int(b) for b in args.child.split(",")], args.folder)))
        return

    from fedpt.cpu import cpu_summary

    # The longer device repeats the shorter one's steps: it runs alone for exactly the extra steps.
    short, long = list(range(args.short)), [b % args.short for b in range(args.long)]
    rounds = []
    for repeat in range(args.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        cases = {case["share"]: case for case in (run_case(short, long, share) for share in order)}
        rounds.append(cases)
        print(f"[{repeat + 1}/{args.repeats}] off {cases[False]['seconds']:.1f} s, on {cases[True]['seconds']:.1f} s "
              f"(threads set: {cases[True]['processes'][1]['thread_changes']})", flush=True)
    off, on = (min(r[share]["seconds"] for r in rounds) for share in (False, True))
    losses = {share: [[s["loss"] for s in p["steps"]] for r in rounds for p in r[share]["processes"]]
              for share in (False, True)}
    cpu = cpu_summary()
    lines = [f"`python bench/core_share.py --short {args.short} --long {args.long} --repeats {args.repeats}` on "
             f"{cpu}, {time.strftime('%Y-%m-%d %H:%M')}: two one-thread device processes, {args.short} vs "
             f"{args.long} packed device steps, best of {args.repeats} alternating rounds.", "",
             "| core sharing | seconds until both are done | ÷ off |", "|---|---|---|",
             f"| off (each process on its one thread) | {off:.1f} | 1.00 |",
             f"| on (the longer one takes the idle core) | {on:.1f} | **{on / off:.3f}** |", "",
             f"Losses of every step bit-identical with sharing on and off: {losses[False] == losses[True]}."]
    from fedpt.bench import write_results

    write_results(args.out, {"cpu": cpu, "rounds": [
        {str(k): v for k, v in r.items()} for r in rounds]}, lines)


if __name__ == "__main__":
    main()
