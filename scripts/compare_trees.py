"""Decode tok/s of the default fusions in two source trees on one GPU, runs alternating.

    python -m scripts.compare_trees BASE_TREE NEW_TREE --batches 1 8 --runs 3 --out ab.json

A kernel change that is not a fusion flag (a new launch layout, a tuned table) cannot be
measured interleaved in one process the way fusions are; this runs each tree in its own
process, BASE, NEW, BASE, NEW, ... (drift shows as a spread, not as a gain), each process
timing CUDA-graph decode of the tree's own default fusions as ``python -m profiling measure``
does (prompt 16, 48 new tokens per round, the median of its rounds). A tree is a checkout or
an exported commit (``git archive <sha> | tar -x -C DIR``). Prints and writes per batch the
medians over runs and NEW / BASE. ``python -m profiling ab --base REF`` A/Bs this tree
against a commit on every figure of the gate's stages, with intervals and verdicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Run inside each tree (its own kernels, engine and tables): one JSON line {batch: tok/s}.
_CHILD = r"""
import json, statistics, sys
import kernels, engine, torch
from profiling import throughput
model = engine.build(device="cuda")
variant = throughput.Variant("default", frozenset(model.flags.key()))
settings = throughput.Settings(rounds=int(sys.argv[2]))
out = {}
for batch in (int(b) for b in sys.argv[1].split(",")):
    rates = throughput.measure_variants(model, [variant], batch, settings)["default"]
    out[batch] = statistics.median(rates)
print(json.dumps(out))
"""


def run_tree(tree: Path, batches: list[int], rounds: int) -> dict[int, float]:
    env = dict(os.environ)
    extra = env.get("PYTHONPATH", "")
    # The tree first: its packages shadow any other checkout on the path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), extra) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, ",".join(map(str, batches)), str(rounds)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=3, help="processes per tree (alternating)")
    p.add_argument("--rounds", type=int, default=10, help="timed decode rounds per process")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for name in ("base", "new"):
        if not (getattr(args, name) / "engine").is_dir():
            print(f"error: {name}={getattr(args, name)} is not a source tree", file=sys.stderr)
            return 2
    if args.runs < 1 or args.rounds < 5:
        print("error: --runs must be >= 1 and --rounds >= 5", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[int, float]]] = {"base": [], "new": []}
    for i in range(args.runs):
        for name in ("base", "new"):
            rates = run_tree(getattr(args, name).resolve(), args.batches, args.rounds)
            runs[name].append(rates)
            print(f"run {i} {name}: " + ", ".join(f"b{b} {r:.1f}" for b, r in rates.items()))
    summary = {}
    for b in args.batches:
        base = statistics.median(r[b] for r in runs["base"])
        new = statistics.median(r[b] for r in runs["new"])
        summary[b] = {"base": base, "new": new, "new/base": new / base}
        print(f"batch {b}: base {base:.1f} tok/s, new {new:.1f} tok/s, new/base {new / base:.3f}")
    if args.out is not None:
        record = {"base": str(args.base), "new": str(args.new), "runs": runs, "summary": summary}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
