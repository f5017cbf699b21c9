"""Does ``MKL_CBWR=AUTO,STRICT`` (set on importing fedpt, for bit-identical resume) slow the server's distillation?

    python bench/mkl_cbwr.py [--preset qwen-cpu] [--repeats 2]

Each measurement is a fresh process (MKL reads the variable when it loads), alternating the two
settings so that machine noise hits both alike. A process loads the server's models once, then
times ``ServerModels.distill`` (proxy-tuned teacher generation + KD steps) on a small KD pool.
Prints the seconds per setting and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
from fedpt.config import load_config
from fedpt.server import ServerModels, load_splits
cfg = load_config(preset=sys.argv[1], overrides=["data.kd_pool_size=4", "distill.steps=2",
                                                  "distill.max_new_tokens=16", "distill.batch_size=4"])
server = ServerModels.load(cfg, load_splits(cfg), large_trainable=False)
server.distill(1)  # warm-up: first-call allocations and oneDNN kernel selection
start = time.perf_counter()
server.distill(2)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def measure(preset: str, strict: bool) -> float:
    # "" keeps MKL's default: importing fedpt sets AUTO,STRICT only where MKL_CBWR is absent
    env = os.environ | {"MKL_CBWR": "AUTO,STRICT" if strict else ""}
    out = subprocess.run([sys.executable, "-c", CHILD, preset], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen-cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for strict in (False, True):
            times[strict].append(measure(args.preset, strict))
            print(f"MKL_CBWR={'AUTO,STRICT' if strict else 'unset':<12} distill {times[strict][-1]:.1f} s", flush=True)
    default, strict = min(times[False]), min(times[True])
    print(f"best of {args.repeats}: unset {default:.1f} s, AUTO,STRICT {strict:.1f} s, ratio {strict / default:.2f}")


if __name__ == "__main__":
    main()
