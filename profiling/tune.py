"""Tune the launch configuration of each fusion's kernel per (shape, dtype, M bucket) on this
GPU, and write the tables the kernels read (kernels/configs/<kernel>/<gpu-slug>.json).

    python -m profiling.tune                         # every fusion, default model, buckets 1 8
    python -m profiling.tune --fusions o_proj_residual --sizes 0.6b 8b --buckets 1 8 64
    python -m profiling.tune --missing               # only what this GPU's tables lack

Candidates are first compiled in parallel worker processes (``--jobs``): Triton's on-disk
cache then serves the timing process, which times them one after another (on the H200, 282
configurations compiled in 21 s; 16 buckets tuned in 43 s). Each candidate is timed as the
gate times kernels (profiling/kernel_timing.py: distinct weights chained in one CUDA graph);
the four fastest are timed again with more rounds, and the winner must pass the numerics rule
before it is written. Nothing autotunes at run time. Buckets and shapes not tuned in a run
keep their committed entries.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton

from engine import fusions as registry
from engine.config import QWEN3_SIZES, qwen3_config
from engine.program import call_fused, dim, draw_inputs, span_ops
from engine.qwen3 import Qwen3ForCausalLM
from kernels import tuning
from kernels.runtime import gpu_name, gpu_slug
from profiling.kernel_timing import fused_us_per_call
from profiling.numerics import check_fusion


def tunable(fusion) -> bool:
    """Whether ``fusion``'s kernel has a launch table to tune (it exports its candidates)."""
    return hasattr(fusion.kernel_module(), "tuning_candidates")


def untuned_kernels() -> list[str]:
    """The tunable kernels with no table for this GPU model (they run their heuristics)."""
    kernels = sorted({f.kernel for f in registry.all_fusions() if tunable(f)})
    return [k for k in kernels if not tuning.table_path(k).exists()]


def kernel_shape(fusion, ops, config) -> tuple[int, int]:
    """(N, K) the kernel's table is keyed by: its weight's shape, N divided by the kernel's
    weight rows per output column (the swiglu kernel: I, K)."""
    weight = next(r for op in ops for r in op.reads if r.kind == "param" and len(r.dims) == 2)
    N, K = (dim(config, d) for d in weight.dims)
    return N // fusion.kernel_module().ROWS_PER_OUTPUT, K


def _program(config):
    with torch.device("meta"):
        return Qwen3ForCausalLM(config.replace(num_hidden_layers=1)).program()


def tuned_buckets(fusion, config, dtype_name: str) -> set[int]:
    """The buckets this GPU's table already holds a tuning result for (kept or heuristic)."""
    N, K = kernel_shape(fusion, span_ops(_program(config), fusion), config)
    path = tuning.table_path(fusion.kernel)
    table = json.loads(path.read_text()) if path.exists() else {}
    timings = table.get("timings", {}).get(f"{N}x{K}", {}).get(dtype_name, {})
    return {int(b) for b in timings}


def _candidates(fusion, config, M: int, dtype: torch.dtype) -> list:
    """The configurations a bucket times: the kernel's candidates, then its heuristic."""
    N, K = kernel_shape(fusion, span_ops(_program(config), fusion), config)
    kernel = fusion.kernel_module()
    return [*kernel.tuning_candidates(M, N, K), kernel.heuristic_config(M, N, K, dtype)]


def _compile_one(job: tuple) -> None:
    """In a worker: one call of the fused step with one configuration, which compiles it into
    Triton's on-disk cache (a configuration that fails is skipped here and logged later)."""
    name, size, M, dtype_name, cfg = job
    fusion, config, dtype = registry.get(name), qwen3_config(size), getattr(torch, dtype_name)
    ops = span_ops(_program(config), fusion)
    inputs = draw_inputs(ops, config, M, dtype, "cuda")
    with contextlib.suppress(Exception), tuning.use_config(fusion.kernel, cfg):
        call_fused(fusion, ops, inputs)
        torch.cuda.synchronize()


def precompile(work: list[tuple], dtype_name: str, jobs: int, log) -> None:
    """Compile every candidate of ``work`` ((fusion, size, buckets) triples) in ``jobs``
    processes."""
    dtype = getattr(torch, dtype_name)
    todo = [
        (fusion.name, size, M, dtype_name, cfg)
        for fusion, size, buckets in work
        for M in buckets
        for cfg in _candidates(fusion, qwen3_config(size), M, dtype)
    ]
    if jobs <= 1 or not todo:
        return
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context) as pool:
        list(pool.map(_compile_one, todo))
    took = time.perf_counter() - started
    log(f"compiled {len(todo)} configurations in {jobs} processes in {took:.0f} s")


def tune_fusion(fusion, config, buckets, dtype, log) -> tuple[dict, dict, tuple[int, int]]:
    program = _program(config)
    ops = span_ops(program, fusion)
    N, K = kernel_shape(fusion, ops, config)
    kernel = fusion.kernel_module()
    configs, timings = {}, {}
    for M in buckets:
        results = []
        for cfg in kernel.tuning_candidates(M, N, K):
            try:
                with tuning.use_config(fusion.kernel, cfg):
                    us = fused_us_per_call(fusion, program, config, M, dtype, reps=2, rounds=5)
            except Exception as exc:  # e.g. out of shared memory: skip the candidate
                log(f"  skip {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                continue
            results.append((us, cfg))
            log(f"  {us:7.2f} us  {cfg}")
        if not results:
            log(f"{fusion.name} N={N} K={K} M={M}: no candidate ran")
            continue
        results.sort(key=lambda item: item[0])
        final = []
        for _, cfg in results[:4]:
            with tuning.use_config(fusion.kernel, cfg):
                final.append((fused_us_per_call(fusion, program, config, M, dtype), cfg))
        final.sort(key=lambda item: item[0])
        best_us, best = final[0]
        # What the table replaces: the kernel's own heuristic, timed the same way.
        heuristic = kernel.heuristic_config(M, N, K, dtype)
        with tuning.use_config(fusion.kernel, heuristic):
            heuristic_us = fused_us_per_call(fusion, program, config, M, dtype)
        timing = {
            "best_us": round(best_us, 3),
            "heuristic_us": round(heuristic_us, 3),
            "candidates": len(results),
        }
        timings[str(M)] = timing
        if heuristic_us <= best_us:  # nothing to gain: the bucket keeps no entry
            timing["kept"] = "heuristic"
            log(f"{fusion.name} N={N} K={K} M={M}: the heuristic is as fast; no entry")
            continue
        with tuning.use_config(fusion.kernel, best):
            bad = [r for r in check_fusion(fusion, program, config, M, dtype, "cuda") if not r.ok]
        if bad:
            raise RuntimeError(f"tuned config {best} fails numerics: {bad[0].summary()}")
        configs[str(M)] = dataclasses.asdict(best)
        log(
            f"{fusion.name} N={N} K={K} M={M}: best {best_us:.2f} us {best} "
            f"(heuristic {heuristic_us:.2f} us)"
        )
    return configs, timings, (N, K)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=tuning.CONFIG_DIR)
    p.add_argument("--fusions", nargs="*", default=[f.name for f in registry.all_fusions()])
    p.add_argument("--sizes", nargs="*", default=["0.6b"], choices=list(QWEN3_SIZES))
    p.add_argument("--buckets", nargs="*", type=int, default=[1, 8])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--missing",
        action="store_true",
        help="skip the buckets this GPU's table already holds a result for (resume a run)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes that compile the candidates first (1: compile while timing)",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profiling.tune needs a CUDA GPU: tuned tables come from real runs")
        return 2
    dtype = getattr(torch, args.dtype)
    log = lambda s: print(s, flush=True)
    work = []
    for name in args.fusions:
        fusion = registry.get(name)
        if not tunable(fusion):
            print(f"{name}: kernel {fusion.kernel} has no tuning candidates: skipped")
            continue
        for size in args.sizes:
            buckets = args.buckets
            if args.missing:
                done = tuned_buckets(fusion, qwen3_config(size), args.dtype)
                buckets = [b for b in buckets if b not in done]
                if not buckets:
                    print(f"{name} {size}: already tuned on this GPU", flush=True)
                    continue
            work.append((fusion, size, buckets))
    precompile(work, args.dtype, args.jobs, log)
    for fusion, size, buckets in work:
        configs, timings, (N, K) = tune_fusion(fusion, qwen3_config(size), buckets, dtype, log)
        path = args.out / fusion.kernel / f"{gpu_slug()}.json"
        table = json.loads(path.read_text()) if path.exists() else {}
        table.update(
            gpu=gpu_name(),
            gpu_slug=gpu_slug(),
            torch=torch.__version__,
            triton=triton.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            method="median us per call, distinct weights chained in one CUDA graph",
        )
        key = f"{N}x{K}"
        table.setdefault("configs", {}).setdefault(key, {}).setdefault(args.dtype, {})
        table["configs"][key][args.dtype].update(configs)
        for bucket, timing in timings.items():
            if timing.get("kept") == "heuristic":
                table["configs"][key][args.dtype].pop(bucket, None)
        table.setdefault("timings", {}).setdefault(key, {}).setdefault(args.dtype, {})
        table["timings"][key][args.dtype].update(timings)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path} ({fusion.name}, {size})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
