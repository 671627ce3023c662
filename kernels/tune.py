"""Tune fused_attn_output_residual's launch configuration per (shape, dtype, M bucket) on this
GPU and write the table the launcher reads (kernels/configs/<gpu-slug>.json).

Run on a GPU runner:  python -m kernels.tune --out kernels/configs
Each candidate is timed with profiling.kernel_timing (28 distinct weights in one CUDA graph);
the winner is checked against float64 (D2) before it is written. Nothing autotunes at run
time: the committed table is read on the first call.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import time
from pathlib import Path

import torch
import triton

from kernels.fused_attn_output import (
    KernelConfig,
    fused_attn_output_residual,
    heuristic_config,
    use_config,
)
from kernels.runtime import gpu_name, gpu_slug
from profiling.kernel_timing import ChainInputs, fused_step, median_us_per_call
from profiling.numerics import check_fused_numerics, draw_inputs

QWEN3_O_PROJ_SHAPES = {
    "0.6b": (1024, 2048),
    "1.7b": (2048, 2048),
    "4b": (2560, 4096),
    "8b": (4096, 4096),
}
# Tuned buckets; an M between two of them takes the next larger one's configuration.
M_BUCKETS = [1, 2, 4, 8, 16, 64, 128, 512, 2048]


# Triton matmul tilings (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), each tried with
# pointer loads and with TMA descriptors.
GEMM_TILINGS = [
    (64, 64, 64, 4, 4),
    (64, 64, 128, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 128, 8, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
]


def _gemv_candidates(M: int, N: int, K: int) -> list[KernelConfig]:
    """Small M. Mostly one tile per K slice (the program's whole weight slice in flight before
    the PDL wait), enough programs to cover the SMs, tiles that fit the registers; from M=32
    also pipelined K loops over smaller tiles (the x tile of a whole slice gets too big)."""
    out = []
    for split in (1, 2, 4, 8, 16):
        slice_k = triton.next_power_of_2(triton.cdiv(K, split))
        if M <= 16:  # float32 multiply-reduce
            for bn, warps in itertools.product((1, 2, 4, 8, 16), (4, 8)):
                programs = triton.cdiv(N, bn) * split
                if M * bn * slice_k <= 16384 and 128 <= programs <= 2048:
                    cfg = KernelConfig("gemv", M, bn, slice_k, warps, 1, pdl=True, split_k=split)
                    out.append(cfg)
        if M < 2:
            continue
        # tl.dot on [16+, BLOCK_N] tiles (rows beyond M are masked); large M also in 16-row
        # tiles, whose x tile of a whole K slice still fits the registers.
        for block_m, bn, warps in itertools.product(sorted({max(16, M), 16}), (16, 32, 64), (4, 8)):
            programs = triton.cdiv(N, bn) * split * triton.cdiv(M, block_m)
            if not 64 <= programs <= 2048:
                continue
            if slice_k >= 64 and bn * slice_k <= 32768 and block_m * slice_k <= 32768:
                cfg = KernelConfig("gemv", block_m, bn, slice_k, warps, 1, pdl=True,
                                   split_k=split, dot=True)  # fmt: skip
                out.append(cfg)
            if M >= 32 and warps == 4 and slice_k >= 256:
                cfg = KernelConfig("gemv", block_m, bn, 128, warps, 3, pdl=True,
                                   split_k=split, dot=True)  # fmt: skip
                out.append(cfg)
    return out


def candidates(M: int, N: int, K: int) -> list[KernelConfig]:
    """Candidate configurations for bucket M (PDL is toggled afterwards on the winner)."""
    out = _gemv_candidates(M, N, K) if M <= 64 else []
    if M >= 64:
        for (bm, bn, bk, warps, stages), tma in itertools.product(GEMM_TILINGS, (False, True)):
            if bm <= M:
                out.append(KernelConfig("gemm", bm, bn, bk, warps, stages, pdl=True, tma=tma))
    return out


def tune_shape(N: int, K: int, dtype: torch.dtype, buckets, log) -> tuple[dict, dict]:
    configs, timings = {}, {}
    for M in buckets:
        inputs = ChainInputs.draw(M, N, K, dtype)
        heuristic = heuristic_config(M, N, K, dtype)
        results = []
        for cfg in [heuristic, *candidates(M, N, K)]:
            try:
                with use_config(cfg):
                    us = median_us_per_call(fused_step, inputs, reps=2, rounds=5)
            except Exception as exc:  # e.g. out of shared memory: skip the candidate
                log(f"  skip {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            results.append((us, cfg))
            log(f"  {us:7.2f} us  {cfg}")
        results.sort(key=lambda item: item[0])
        if not results:  # the bucket keeps no entry: its M takes the next tuned bucket's
            log(f"N={N} K={K} M={M}: no candidate ran")
            continue
        # Re-time the four fastest with more rounds: the first pass is noisy.
        final = []
        for _, cfg in results[:4]:
            with use_config(cfg):
                final.append((median_us_per_call(fused_step, inputs, reps=4, rounds=15), cfg))
        pdl_variant = dataclasses.replace(final[0][1], pdl=not final[0][1].pdl)
        with use_config(pdl_variant):
            final.append((median_us_per_call(fused_step, inputs, reps=4, rounds=15), pdl_variant))
        final.sort(key=lambda item: item[0])
        best_us, best = final[0]
        x, r, w = draw_inputs(M, N, K, dtype, "cuda")
        with use_config(best):
            numerics = check_fused_numerics(fused_attn_output_residual, x, r, w)
        if not numerics.ok:
            raise RuntimeError(f"tuned config {best} fails numerics: {numerics.summary()}")
        heuristic_us = next((us for us, c in results if c == heuristic), float("nan"))
        configs[str(M)] = best.to_json()
        timings[str(M)] = {
            "best_us": round(best_us, 3),
            "heuristic_us": round(heuristic_us, 3),
            "candidates": len(results),
        }
        log(f"N={N} K={K} M={M}: best {best_us:.2f} us {best} (heuristic {heuristic_us:.2f} us)")
        del inputs
    return configs, timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("configs"))
    parser.add_argument("--shapes", nargs="*", default=list(QWEN3_O_PROJ_SHAPES))
    parser.add_argument("--buckets", nargs="*", type=int, default=M_BUCKETS)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels.tune needs a CUDA GPU: tuned tables come from real runs")
    dtype = getattr(torch, args.dtype)
    started = time.time()
    table = {
        "gpu": gpu_name(),
        "gpu_slug": gpu_slug(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": "median us per call, 28 distinct weights chained in one CUDA graph",
        "configs": {},
        "timings": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{gpu_slug()}.json"
    if path.exists():  # shapes and buckets not tuned in this run keep their configurations
        previous = json.loads(path.read_text())
        table["configs"] = previous.get("configs", {})
        table["timings"] = previous.get("timings", {})
    for name in args.shapes:
        N, K = QWEN3_O_PROJ_SHAPES[name]
        key = f"{N}x{K}"
        configs, timings = tune_shape(N, K, dtype, args.buckets, lambda s: print(s, flush=True))
        table["configs"].setdefault(key, {}).setdefault(args.dtype, {}).update(configs)
        table["timings"].setdefault(key, {}).setdefault(args.dtype, {}).update(timings)
        # Written after every shape: a run cut short keeps the shapes it finished.
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path} ({name}) at {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
