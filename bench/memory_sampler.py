"""What sampling every process's memory costs a compute-bound job, side by side in one run.

    python bench/memory_sampler.py [--children 4] [--gib 1.5] [--seconds 20] [--repeats 2] [--out bench/results/memory_sampler]

``fedpt run`` samples the memory of its process tree for P8 (``fedpt.metrics.PeakMemory``).
Reading a process's PSS walks its page tables, which costs kernel time in proportion to the
memory it maps. This starts ``--children`` processes holding ``--gib`` GiB each (as a job's
device actors and Ray services sit beside the server), then times a fixed amount of two-thread
fp32 matrix products in this process three ways, alternating over ``--repeats`` rounds:

- no sampler;
- PSS of every process every second (what ``PeakMemory`` did before 2026-12-07);
- ``PeakMemory`` as it is (RSS every second, PSS at new highs of the RSS sum within a CPU budget).

Prints each way's seconds (best of the repeats), its ratio to no sampler, the kernel CPU seconds
this process spent and the PSS reads made, with the CPU named; writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import fedpt  # noqa: F401  (before torch, as in fedpt run)
import psutil
import torch

HOLD = ("import sys, time\n"
        "block = bytearray(int(float(sys.argv[1]) * 2**30))\n"
        "for i in range(0, len(block), 4096):\n"
        "    block[i] = 1  # touch every page: resident, as a model's weights are\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n")


class EverySecondPss:
    """The old sampler: PSS of this process and all its children, every second."""

    def __init__(self) -> None:
        self.reads, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    proc.memory_full_info()
                except psutil.Error:
                    continue
            self.reads += 1
            self._stop.wait(1.0)

    def __enter__(self) -> "EverySecondPss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def work(iterations: int) -> float:
    """Seconds for ``iterations`` fp32 products of (1024 x 2048) @ (2048 x 2048) on two threads."""
    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    started = time.perf_counter()
    for _ in range(iterations):
        torch.mm(a, b)
    return time.perf_counter() - started


def main() -> None:
    from fedpt.cpu import cpu_summary
    from fedpt.metrics import PeakMemory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--gib", type=float, default=1.5)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the work without a sampler")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory_sampler"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    children = [subprocess.Popen([sys.executable, "-c", HOLD, str(args.gib)], stdout=subprocess.PIPE, text=True)
                for _ in range(args.children)]
    try:
        for child in children:
            child.stdout.readline()  # "ready": its memory is resident
        probe = work(5)
        iterations = max(5, int(args.seconds / (probe / 5)))
        ways = {"no sampler": None, "PSS every second (before)": EverySecondPss, "PeakMemory (now)": PeakMemory}
        results: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for name, sampler in ways.items():
                kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime
                if sampler is None:
                    seconds, reads = work(iterations), 0
                else:
                    with sampler() as running:
                        seconds = work(iterations)
                    reads = getattr(running, "pss_reads", getattr(running, "reads", 0))
                kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel
                best = results.get(name)
                if best is None or seconds < best["seconds"]:
                    results[name] = {"seconds": seconds, "kernel_seconds": kernel, "pss_reads": reads}
                print(f"[{repeat + 1}/{args.repeats}] {name}: {seconds:.1f} s, kernel {kernel:.1f} s, "
                      f"{reads} PSS reads", flush=True)
    finally:
        for child in children:
            child.kill()
    none = results["no sampler"]["seconds"]
    cpu = cpu_summary()
    lines = [f"`python bench/memory_sampler.py --children {args.children} --gib {args.gib} --seconds {args.seconds:g} "
             f"--repeats {args.repeats}` on {cpu}, {time.strftime('%Y-%m-%d %H:%M')}: {iterations} two-thread fp32 "
             f"products beside {args.children} processes of {args.gib} GiB each; best of {args.repeats} alternating "
             "rounds.", "",
             "| sampler | seconds | ÷ no sampler | kernel CPU s (this process) | PSS reads |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds']:.1f} | **{r['seconds'] / none:.3f}** | {r['kernel_seconds']:.1f} | "
                     f"{r['pss_reads']} |")
    from fedpt.bench import write_results

    write_results(args.out, {"cpu": cpu, "iterations": iterations, "results": results}, lines)


if __name__ == "__main__":
    main()
