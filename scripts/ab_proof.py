"""Prove the A/B on a GPU: a tree against its own commit comes out "same", a planted slowdown
"slower", and bisect finds the commit that planted it.

Each run clones this repository's HEAD into a temporary folder (``git clone --shared``: the
committed tree), applies one plant there as an uncommitted edit, and runs ``python -m profiling
ab --base HEAD`` in the clone in a fresh process: the planted tree against its own commit.
Plants (the FMA chains of scripts/gate_proof.py: no launch and no numerical change; their
sizes are first guesses, the A/B reports the effect measured):

- ``none``           nothing: an A/A (expect exit 0 and every figure "same")
- ``kernel_3pct``    a 60-FMA chain in the linear+residual kernel: o_proj_residual's and
                     down_proj_residual's kernel ratios ~3% higher
- ``attention_3pct`` a 60-FMA chain in decode attention: its ratio to a copy ~3% higher
- ``e2e_2pct``       a 700-FMA chain in the linear+residual kernel: default tok/s ~2% lower

    python -m scripts.ab_proof --plant none --runs 10 --out proof-ab
    python -m scripts.ab_proof --plant kernel_3pct --runs 5 --out proof-ab
    python -m scripts.ab_proof --bisect kernel_3pct --out proof-ab   # 3 commits, the plant, 3

``--bisect PLANT`` commits three empty commits, the plant, three more in the clone and runs
``python -m profiling bisect HEAD~7 HEAD``: the first bad commit must be the plant's. Writes
per run the exit code, the verdicts (ab.json) and the time to ``--out``/proof.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.gate_proof import _fma_plant, attention_plant

ROOT = Path(__file__).resolve().parent.parent
PLANTS = {
    "none": None,
    "kernel_3pct": _fma_plant(60),
    "attention_3pct": attention_plant(60),
    "e2e_2pct": _fma_plant(700),
}
BISECT_SUBJECT = "planted slowdown"


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(dest)], check=True)
    return dest


def plant(tree: Path, name: str) -> None:
    if PLANTS[name] is None:
        return
    path, apply = PLANTS[name]
    text = (tree / path).read_text()
    changed = apply(text)
    if changed == text:
        raise SystemExit(f"plant {name}: its anchor is not in {path} (the code moved: update it)")
    (tree / path).write_text(changed)


def _commit(tree: Path, message: str, *extra: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "ab proof", "GIT_AUTHOR_EMAIL": "ab@proof"}
    env.update(GIT_COMMITTER_NAME="ab proof", GIT_COMMITTER_EMAIL="ab@proof")
    subprocess.run(["git", "commit", "-q", *extra, "-m", message], cwd=tree, env=env, check=True)


def bisect_history(tree: Path, name: str, before: int = 3, after: int = 3) -> None:
    """``before`` empty commits, the plant, ``after`` empty commits on top of HEAD."""
    for i in range(before):
        _commit(tree, f"empty {i}", "--allow-empty")
    plant(tree, name)
    _commit(tree, BISECT_SUBJECT, "-a")
    for i in range(after):
        _commit(tree, f"empty {before + i}", "--allow-empty")


def run_in(tree: Path, args: list[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "profiling", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", flush=True)
    return proc.returncode, proc.stdout, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plant", choices=tuple(PLANTS), default="none")
    p.add_argument("--bisect", choices=tuple(p for p in PLANTS if p != "none"), default=None)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--pairs", type=int, default=None, help="ab --pairs (default: ab's)")
    p.add_argument("--out", type=Path, default=Path("proof-ab"))
    args = p.parse_args(argv)
    if args.runs < 1 or (args.pairs is not None and args.pairs < 1):
        print("error: --runs and --pairs must be >= 1", file=sys.stderr)
        return 2
    pairs = [] if args.pairs is None else ["--pairs", str(args.pairs)]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for i in range(1 if args.bisect else args.runs):
        with tempfile.TemporaryDirectory(prefix="ab-proof-") as tmp:
            tree = clone(Path(tmp) / "tree")
            out = (args.out / f"run-{i}").resolve()
            if args.bisect:
                bisect_history(tree, args.bisect)
                cmd = ["bisect", "HEAD~7", "HEAD", "--out", str(out), *pairs]
                code, stdout, took = run_in(tree, cmd)
                found = f"first bad commit: {_head_of(tree, BISECT_SUBJECT)}" in stdout
                results.append({"plant": args.bisect, "exit": code, "found": found, "s": took})
                continue
            plant(tree, args.plant)
            code, _, took = run_in(tree, ["ab", "--base", "HEAD", "--out", str(out), *pairs])
            ab = json.loads((out / "ab.json").read_text()) if (out / "ab.json").exists() else {}
            verdicts = {e["name"]: e["verdict"] for e in ab.get("estimates", [])}
            results.append({"plant": args.plant, "exit": code, "verdicts": verdicts, "s": took})
        print(f"run {i + 1}: plant {results[-1]['plant']}, exit {code}, {took:.0f} s", flush=True)
    (args.out / "proof.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out / 'proof.json'}")
    return 0


def _head_of(tree: Path, subject: str) -> str:
    out = subprocess.run(
        ["git", "log", "--format=%H", f"--grep={subject}", "-1"],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
