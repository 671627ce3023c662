"""Tune the launch configuration of each fusion's kernel per (shape, dtype, M bucket) on this
GPU, and write the tables the kernels read (kernels/configs/<kernel>/<gpu-slug>.json).

    python -m profiling.tune                         # every fusion, default model, buckets 1 8
    python -m profiling.tune --fusions o_proj_residual --sizes 0.6b 8b --buckets 1 8 64

Each candidate is timed as the gate times kernels (profiling/kernel_timing.py: distinct
weights chained in one CUDA graph); the four fastest are timed again with more rounds, and the
winner must pass the numerics rule before it is written. Nothing autotunes at run time.
Buckets and shapes not tuned in a run keep their committed entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch
import triton

from engine import fusions as registry
from engine.config import QWEN3_SIZES, qwen3_config
from engine.program import dim, span_ops
from engine.qwen3 import Qwen3ForCausalLM
from kernels import tuning
from kernels.runtime import gpu_name, gpu_slug
from profiling.kernel_timing import fused_us_per_call
from profiling.numerics import check_fusion


def tunable(fusion) -> bool:
    """Whether ``fusion``'s kernel has a launch table to tune (it exports its candidates)."""
    return hasattr(fusion.kernel_module(), "tuning_candidates")


def kernel_shape(fusion, ops, config) -> tuple[int, int]:
    """(N, K) the kernel's table is keyed by: its weight's shape, N divided by the kernel's
    weight rows per output column (the swiglu kernel: I, K)."""
    weight = next(r for op in ops for r in op.reads if r.kind == "param" and len(r.dims) == 2)
    N, K = (dim(config, d) for d in weight.dims)
    return N // fusion.kernel_module().ROWS_PER_OUTPUT, K


def tune_fusion(fusion, config, buckets, dtype, log) -> tuple[dict, dict, tuple[int, int]]:
    with torch.device("meta"):
        program = Qwen3ForCausalLM(config.replace(num_hidden_layers=1)).program()
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
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profiling.tune needs a CUDA GPU: tuned tables come from real runs")
        return 2
    dtype = getattr(torch, args.dtype)
    for name in args.fusions:
        fusion = registry.get(name)
        if not tunable(fusion):
            print(f"{name}: kernel {fusion.kernel} has no tuning candidates: skipped")
            continue
        for size in args.sizes:
            configs, timings, (N, K) = tune_fusion(
                fusion, qwen3_config(size), args.buckets, dtype, lambda s: print(s, flush=True)
            )
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
            print(f"wrote {path} ({name}, {size})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
