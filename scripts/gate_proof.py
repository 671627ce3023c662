"""Prove the gate on a GPU: unchanged code passes it every time, and every planted regression
fails it.

Each run copies the tree (the working tree's files, with this GPU's baseline), applies one
plant by editing the copy's source, runs ``python -m profiling gate`` there in a fresh
process, and records the verdict (exit code), the failing checks and the time. Plants:

- ``flag_off``         o_proj_residual is no longer among the engine's default fusions
- ``extra_kernel``     one extra kernel per o_proj_residual instance (an in-place add of 0)
- ``slow_5pct``        the linear+residual kernel ~5% slower at decode sizes: every program
                       runs a dependent chain of 100 float32 FMAs after its dot (no launch, no
                       numerical change)
- ``gain_halved``      the same with 1000 FMAs (~2 µs a call): about half of o_proj_residual's
                       end-to-end gain gone
- ``numerics_1e2``     o_proj_residual scales the residual by 1.01 (errors ~1e-2)
- ``fp32_tf32``        the kernel's float32 tl.dot in TF32 instead of IEEE float32
- ``residual_dropped`` o_proj_residual leaves the residual out

    python -m scripts.gate_proof --out proof --runs 10 --gpus 0 1   # ~8 min on two H100s
    python -m scripts.gate_proof --rejudge proof     # stored runs vs the current baseline

With several GPUs, runs go to them in parallel, one gate per GPU at a time. ``--rejudge``
judges the runs a proof stored (each run's gate.json) against the committed baseline again,
without measuring: after a baseline is rebuilt, it shows what the stored runs would have got
(in sample: those runs may be part of the new baseline; only a new proof is out of sample).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FMA_CHAIN = """
    # planted: a dependent chain of {n} float32 FMAs per program, after the dot
    slow = tl.sum(acc, axis=1)
    for _ in range({n}):
        slow = slow * 1.0000001 + 1e-7
    acc += (slow * 0.0)[:, None]
"""


def _fma_plant(n: int):
    def apply(text: str) -> str:
        anchor = "    if SPLIT_K == 1:\n        _store_out("
        return text.replace(anchor, _FMA_CHAIN.format(n=n) + anchor, 1)

    return ("kernels/linear_residual.py", apply)


def _sub(path: str, old: str, new: str):
    return (path, lambda text: text.replace(old, new, 1))


O_PROJ = (
    "fused=lambda attn, residual, o_proj_weight: linear_residual(\n"
    "            attn, residual, o_proj_weight, out=residual\n"
    "        ),"
)
PLANTS = {
    "flag_off": _sub(
        "engine/fusions.py",
        'doc="attention output projection + attention residual add (in place)",',
        'doc="attention output projection + attention residual add (in place)",\n'
        "        default=False,",
    ),
    "extra_kernel": _sub(
        "engine/fusions.py",
        O_PROJ,
        O_PROJ.replace("out=residual\n        ),", "out=residual\n        ).add_(0),"),
    ),
    "slow_5pct": _fma_plant(100),
    "gain_halved": _fma_plant(1000),
    "numerics_1e2": _sub(
        "engine/fusions.py", O_PROJ, O_PROJ.replace("out=residual", "1.01, out=residual")
    ),
    "fp32_tf32": _sub(
        "kernels/linear_residual.py",
        'acc = tl.dot(a, b, acc, input_precision="ieee")',
        'acc = tl.dot(a, b, acc, input_precision="tf32")',
    ),
    "residual_dropped": _sub(
        "engine/fusions.py", O_PROJ, O_PROJ.replace("out=residual", "0.0, out=residual")
    ),
}


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, without .git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # a copied tree without .git
        skip = {".git", "__pycache__", ".pytest_cache", ".tox", ".whl", ".benchmarks", "results"}
        listed = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
        ]
    for rel in listed:
        src = ROOT / rel
        if src.is_file() and not rel.startswith("results/"):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def plant(tree: Path, name: str) -> None:
    path, apply = PLANTS[name]
    target = tree / path
    text = target.read_text()
    changed = apply(text)
    if changed == text:
        raise SystemExit(f"plant {name}: its anchor is not in {path} (the code moved: update it)")
    target.write_text(changed)


def run_one(work: Path, label: str, name: str | None, gpu: str, out: Path) -> dict:
    tree = work / label
    if tree.exists():
        shutil.rmtree(tree)
    copy_tree(tree)
    if name is not None:
        plant(tree, name)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONPATH": str(tree)}
    env.setdefault("FUSIONGUARD_COMMIT", "proof")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "profiling", "gate", "--out", str(out / label)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    (out / f"{label}.log").write_text(log)
    failing = re.findall(r"^\s+FAIL \[([a-z_]+)\] (\S+)", proc.stdout, flags=re.M)
    gate_time = re.search(r"gate time: (\d+) s", proc.stdout)
    shutil.rmtree(tree, ignore_errors=True)
    return {
        "label": label,
        "plant": name,
        "gpu": gpu,
        "exit": proc.returncode,
        "verdict": {0: "PASS", 1: "FAIL", 2: "USAGE", 3: "NO BASELINE"}.get(proc.returncode, "?"),
        "failing": [f"{stage} {key}" for stage, key in failing],
        "failing_stages": sorted({stage for stage, _ in failing}),
        "seconds": round(seconds, 1),
        "gate_seconds": int(gate_time.group(1)) if gate_time else None,
    }


def rejudge(folder: Path) -> int:
    """Each stored run against the current baseline (timing checks that the run measured
    twice are judged on the second measurement, as the gate did)."""
    from profiling.baselines import compare, load_baseline

    results = []
    for path in sorted(folder.glob("*/gate.json")):
        run = json.loads(path.read_text())
        baseline = load_baseline(run["gpu_slug"])
        run.pop("gate", None)
        failing = {(c.stage, c.key) for c in compare(run, baseline).failures}
        if "remeasured" in run:
            again = {**run, **run["remeasured"]}
            timing = {(c.stage, c.key) for c in compare(again, baseline).failures if c.timing}
            failing = {f for f in failing if f[0] not in ("kernel_ratio", "tok_s", "speedup")}
            failing |= timing
        plant = None if path.parent.name.startswith("unchanged") else path.parent.name[6:]
        results.append(
            {
                "label": path.parent.name,
                "plant": plant,
                "verdict": "FAIL" if failing else "PASS",
                "failing": sorted(f"{s} {k}" for s, k in failing),
            }
        )
        stages = sorted({f.split()[0] for f in results[-1]["failing"]})
        print(f"{path.parent.name:24s} {results[-1]['verdict']}  {', '.join(stages)}")
    (folder / "rejudged.json").write_text(json.dumps(results, indent=1) + "\n")
    unchanged = [r for r in results if r["plant"] is None]
    planted = [r for r in results if r["plant"] is not None]
    passed = sum(r["verdict"] == "PASS" for r in unchanged)
    failed = sum(r["verdict"] == "FAIL" for r in planted)
    print(
        f"rejudged: unchanged {passed}/{len(unchanged)} pass, plants {failed}/{len(planted)} fail"
    )
    return 0 if passed == len(unchanged) and failed == len(planted) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="proof")
    p.add_argument("--runs", type=int, default=10, help="runs of unchanged code")
    p.add_argument("--plants", nargs="*", default=list(PLANTS), choices=list(PLANTS))
    p.add_argument("--gpus", nargs="+", default=["0"])
    p.add_argument("--work", default="/tmp/fusionguard-proof")
    p.add_argument("--rejudge", type=Path, default=None, help="a proof folder to judge again")
    args = p.parse_args(argv)
    if args.rejudge is not None:
        return rejudge(args.rejudge)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    # Plants and unchanged runs alternate, so that a pass cut short has some of both.
    unchanged = [(f"unchanged_{i + 1}", None) for i in range(args.runs)]
    planted = [(f"plant_{name}", name) for name in args.plants]
    jobs = [job for pair in itertools.zip_longest(planted, unchanged) for job in pair if job]
    free: queue.Queue[str] = queue.Queue()
    for gpu in args.gpus:
        free.put(gpu)
    done: list[dict] = []
    lock = threading.Lock()

    def job(label_name):
        gpu = free.get()
        try:
            result = run_one(work, *label_name, gpu, out)
        finally:
            free.put(gpu)
        with lock:  # written as it goes: a pass cut short keeps what finished
            done.append(result)
            (out / "proof.json").write_text(json.dumps({"results": done}, indent=1) + "\n")
        mark = "ok" if (result["exit"] == 0) == (result["plant"] is None) else "UNEXPECTED"
        print(
            f"{result['label']:24s} gpu {gpu}: {result['verdict']:5s} {mark:10s} "
            f"{result['seconds']:5.0f} s  {', '.join(result['failing_stages'])}",
            flush=True,
        )
        return result

    with concurrent.futures.ThreadPoolExecutor(len(args.gpus)) as pool:
        results = list(pool.map(job, jobs))
    unchanged = [r for r in results if r["plant"] is None]
    planted = [r for r in results if r["plant"] is not None]
    summary = {
        "unchanged_passed": sum(r["exit"] == 0 for r in unchanged),
        "unchanged_runs": len(unchanged),
        "plants_failed": sum(r["exit"] == 1 for r in planted),
        "plants": len(planted),
        "max_gate_seconds": max((r["gate_seconds"] or 0) for r in results),
        "results": results,
    }
    (out / "proof.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"unchanged: {summary['unchanged_passed']}/{summary['unchanged_runs']} passed; "
        f"plants: {summary['plants_failed']}/{summary['plants']} failed; "
        f"slowest gate {summary['max_gate_seconds']} s"
    )
    ok = summary["unchanged_passed"] == len(unchanged) and summary["plants_failed"] == len(planted)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
