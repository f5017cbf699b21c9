"""Rouge-L cost of central differential privacy: one `fedpt run` per noise level, side by side.

    python bench/dp_noise.py --preset tiny --noise 0,0.1,0.5,1 [--set key=value ...] [--out runs/dp-noise]

Noise 0 is the run without DP. Each run uses the same seed, data and clip (privacy.clipping_norm,
default: the median update norm of the no-DP run, measured first), so the columns differ only by
the noise. Prints a Markdown table: final Rouge-L of the small and the proxy-tuned large LM on
the first evaluation set, and the epsilon spent (delta = privacy.delta).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(out: Path, preset: str, overrides: list[str]) -> dict:
    args = [sys.executable, "-m", "fedpt.cli", "run", "--preset", preset, "--no-progress", "--overwrite",
            "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--noise", default="0,0.1,0.5,1")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/dp-noise"))
    args = parser.parse_args()
    noises = [float(x) for x in args.noise.split(",")]
    base = [*args.overrides, "run.systems=['fedpt']"]
    results = {}
    clip = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("privacy.clipping_norm=")), None)
    for noise in sorted(noises):
        if noise == 0:
            summary = run(args.out / "no-dp", args.preset, base)
            final = summary["systems"]["fedpt"]["final"]
            clip = clip or f"{final['update_norm_median']:.4g}"
        else:
            summary = run(args.out / f"noise-{noise:g}", args.preset,
                          [*base, "privacy.dp='central'", f"privacy.noise_multiplier={noise}",
                           f"privacy.clipping_norm={clip or 1.0}"])
        results[noise] = summary
    print(f"clip {clip}; preset {args.preset}; {' '.join(args.overrides)}")
    print("| noise multiplier | Rouge-L small | Rouge-L proxy | epsilon |")
    print("|---|---|---|---|")
    for noise, summary in results.items():
        final = summary["systems"]["fedpt"]["final"]
        eps = final.get("dp_epsilon")
        print(f"| {noise:g}{' (no DP)' if noise == 0 else ''} | {final['rougeL_small']:.2f} | "
              f"{final['rougeL_proxy']:.2f} | {'inf' if eps is None else f'{eps:.2f}'} |")


if __name__ == "__main__":
    main()
