"""``python -m profiling onboard``: a GPU model the suite has never seen, in one command.

Stages, each in a fresh process (a tuned table is read once per process), each timed:

1. tune     every tunable fusion's launch table for this GPU at the suite's decode sizes: the
            default model's shapes, and every dense Qwen3 shape for the fusions the kernel
            benchmark times at every size (profiling.kernel_timing.bench_sizes). Each written
            configuration passes the numerics rule first (profiling/tune.py). Buckets this
            GPU's table already holds are kept (``--retune`` tunes them again).
2. record   the decode baseline from 3 processes (skipped when this GPU has one; ``--force``
            records anew)
3. bench    the pytest-benchmark kernel baseline (skipped when this GPU has one; ``--force``)
4. gate     the gate once, against what was just recorded

It ends with the files written and the ``git add`` that commits them. Exit code: the first
failing stage's (docs/definitions.md, "Exit codes"); 0 when the gate passes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from engine import fusions as registry
from kernels import tuning
from kernels.runtime import gpu_name, gpu_slug
from profiling import baselines, measure
from profiling.kernel_timing import bench_sizes
from profiling.tune import tunable

COMMAND = "python -m profiling onboard   (tox -e onboard)"


def untuned_note() -> str | None:
    """One line when a tunable kernel has no launch table for this GPU model, else None."""
    from profiling.tune import untuned_kernels

    missing = untuned_kernels()
    if not missing:
        return None
    return (
        f"note: no tuned launch table for {gpu_slug()} ({', '.join(missing)}): those kernels "
        f"run their heuristics; tune and record this GPU with {COMMAND}"
    )


def tune_commands(buckets: tuple[int, ...], retune: bool) -> list[list[str]]:
    """One ``profiling.tune`` run per set of sizes, covering every tunable fusion."""
    by_sizes: dict[tuple[str, ...], list[str]] = {}
    for fusion in registry.all_fusions():
        if tunable(fusion):
            by_sizes.setdefault(tuple(bench_sizes(fusion)), []).append(fusion.name)
    missing = [] if retune else ["--missing"]
    return [
        [
            *("-m", "profiling.tune", "--fusions", *names, "--sizes", *sizes),
            *("--buckets", *map(str, buckets), *missing),
        ]
        for sizes, names in by_sizes.items()
    ]


def _run(name: str, args: list[str], log) -> tuple[int, float]:
    cmd = [sys.executable, *args]
    log(f"\n=== {name}: {' '.join(['python', *args])}")
    started = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    took = time.perf_counter() - started
    log(f"=== {name}: exit {rc} in {took:.0f} s")
    return rc, took


def onboard(*, root: Path, force: bool, retune: bool, log=print) -> int:
    slug = gpu_slug()
    log(f"onboarding {gpu_name()} ({slug})")
    started = time.perf_counter()
    stages: list[tuple[str, list[str]]] = [
        (f"tune {i + 1}", cmd)
        for i, cmd in enumerate(tune_commands(measure.Plan().kernel_rows, retune))
    ]
    baseline = baselines.baseline_path(slug, root)
    if baseline.exists() and not force:
        log(f"record: skipped, {baseline} exists (--force records anew)")
    else:
        stages.append(("record", ["-m", "profiling", "record", "--force", "--root", str(root)]))
    try:
        bench_file = baselines.kernel_benchmark_file(slug, root=root)
    except baselines.BaselineMissing:
        bench_file = None
    if bench_file is not None and not force:
        log(f"bench: skipped, {bench_file} exists (--force saves anew)")
    else:
        stages.append(("bench", ["-m", "profiling", "bench", "--save", "--root", str(root)]))
    stages.append(("gate", ["-m", "profiling", "gate", "--root", str(root)]))
    times = {}
    status = 0
    for name, args in stages:
        rc, times[name] = _run(name, args, log)
        if rc != 0:
            status = rc
            log(f"\nONBOARDING STOPPED at {name} (exit {rc})")
            break
    total = time.perf_counter() - started
    log("\nstage times: " + ", ".join(f"{n} {t:.0f} s" for n, t in times.items()))
    log(f"onboarding time: {total:.0f} s ({total / 60:.1f} min)")
    written = [
        str(tuning.table_path(k).relative_to(Path.cwd()))
        for k in sorted({f.kernel for f in registry.all_fusions() if tunable(f)})
        if tuning.table_path(k).exists()
    ]
    folder = baselines.baseline_dir(slug, root)
    if folder.exists():
        written.append(_relative(folder))
    if written:
        log("\nwritten for this GPU (commit them):\n  git add " + " ".join(written))
    return status


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
