"""Rouge-L cost of differential privacy: one `fedpt run` per noise level, side by side.

    python bench/dp_noise.py --preset tiny --noise 0,0.1,0.5,1 [--local 0.5,1] [--set key=value ...]
                             [--out runs/dp-noise]

Central DP at each noise multiplier (0 is the run without DP), then local DP at each
per-round epsilon of ``--local``. Each run uses the same seed, data and clip (privacy.clipping_norm,
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
    parser.add_argument("--local", default="", help="local-DP epsilons per round, e.g. 0.5,1")
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
        results[("central", noise)] = summary
    for eps in [float(x) for x in args.local.split(",") if x]:
        results[("local", eps)] = run(args.out / f"local-{eps:g}", args.preset,
                                      [*base, "privacy.dp='local'", f"privacy.local_epsilon={eps}",
                                       f"privacy.clipping_norm={clip or 1.0}"])
    print(f"clip {clip}; preset {args.preset}; {' '.join(args.overrides)}")
    print("| DP | setting | Rouge-L small | Rouge-L proxy | epsilon |")
    print("|---|---|---|---|---|")
    for (mode, value), summary in results.items():
        final = summary["systems"]["fedpt"]["final"]
        eps = final.get("dp_epsilon")
        setting = "no DP" if value == 0 else (f"noise {value:g}" if mode == "central" else f"epsilon {value:g}/round")
        print(f"| {mode if value else 'off'} | {setting} | {final['rougeL_small']:.2f} | "
              f"{final['rougeL_proxy']:.2f} | {'inf' if eps is None else f'{eps:.2f}'} |")


if __name__ == "__main__":
    main()
