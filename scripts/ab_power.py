"""How often the A/B's verdicts come out right, simulated from the measured noise.

Each figure's noise between processes is read from the committed baselines (every baseline
holds its figures per process, ``runs``): the sd of log(figure), pooled over the figures of
each kind and the baselines, and the worst single figure. Then A/Bs are simulated with
``profiling.ab.estimate`` itself (the verdict the A/B gives): per pair, one log ratio with the
difference of two processes' noise, plus the planted effect. Kernel ratios' noise is scaled
from the baselines' rounds to the current plan's (the median of n rounds: sd ~ 1/sqrt(n)).

    python -m scripts.ab_power [--pairs 4 5 6] [--trials 4000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from profiling import ab
from profiling.measure import Plan

ROOT = Path(__file__).resolve().parent.parent
# A planted slowdown per kind, in the worse direction (kernel ratio up, tok/s and speed-up down).
EFFECTS = {"kernel_ratio": 0.03, "tok_s": -0.02, "speedup": -0.02}


def noise(paths: list[Path]) -> dict[str, list[float]]:
    """Per kind, the sd of log(figure) across a baseline's processes, one per figure."""
    out: dict[str, list[float]] = {kind: [] for kind in EFFECTS}
    for path in paths:
        base = json.loads(path.read_text())
        scale = math.sqrt(base["plan"].get("kernel_rounds", 11) / Plan().kernel_rounds)
        for e in base["kernel_ratios"].values():
            out["kernel_ratio"].append(scale * _sd_log(e["runs"]))
        for per_batch in base["e2e"].values():
            out["tok_s"] += [_sd_log(v["runs"]) for v in per_batch["variants"].values()]
            out["speedup"] += [_sd_log(s["runs"]) for s in per_batch["speedups"].values()]
    return out


def _sd_log(values: list[float]) -> float:
    return statistics.stdev(math.log(v) for v in values)


def rates(kind: str, sd: float, pairs: int, trials: int, rng: random.Random) -> dict[str, float]:
    """Fractions of simulated A/Bs: an unchanged figure "same" and "slower", a planted one
    "slower"."""

    def verdict(shift: float) -> str:
        logs = [math.log1p(shift) + rng.gauss(0, sd) - rng.gauss(0, sd) for _ in range(pairs)]
        return ab.estimate("f", kind, logs).verdict

    unchanged = [verdict(0.0) for _ in range(trials)]
    planted = [verdict(EFFECTS[kind]) for _ in range(trials)]
    return {
        "same": unchanged.count("same") / trials,
        "false_slower": unchanged.count("slower") / trials,
        "planted_slower": planted.count("slower") / trials,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[4, 5, 6])
    p.add_argument("--trials", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.pairs) < 2 or args.trials < 1:
        p.error("--pairs must be >= 2 (an interval needs two) and --trials >= 1")
    paths = sorted((ROOT / "perf_baselines").glob("*/baseline.json"))
    rng = random.Random(args.seed)
    print(f"noise from {', '.join(str(p.relative_to(ROOT)) for p in paths)}")
    print("kind          noise   sd of log  pairs  same  false slower  planted slower (effect)")
    for kind, sds in noise(paths).items():
        pooled = math.sqrt(statistics.fmean(s * s for s in sds))
        for label, sd in (("pooled", pooled), ("worst", max(sds))):
            for n in args.pairs:
                r = rates(kind, sd, n, args.trials, rng)
                print(
                    f"{kind:<13} {label:<7} {sd:>8.3%}  {n:>5}  {r['same']:>4.0%}  "
                    f"{r['false_slower']:>12.2%}  {r['planted_slower']:>14.1%} "
                    f"({EFFECTS[kind]:+.0%})"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
