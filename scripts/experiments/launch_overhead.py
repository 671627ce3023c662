"""Experiment: host time per eager call (M=1, Qwen3-0.6B o_proj shape): F.linear + add vs the
fused launcher, through kernels.runtime.launch's fast path and through Triton's own path
(FUSIONGUARD_TRITON_LAUNCH=jit), out of place and in place; and one small op (RMSNorm) both
ways. Then a cProfile of the fused fast path."""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

import kernels.runtime as runtime
from kernels.fused_attn_output import fused_attn_output_residual, unfused_attn_output_residual
from kernels.rms_norm import rms_norm


def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    norm_w = torch.ones(1024, device="cuda", dtype=torch.bfloat16)
    cases = {
        "unfused F.linear+add": lambda: unfused_attn_output_residual(x, r, w),
        "fused": lambda: fused_attn_output_residual(x, r, w),
        "fused in place": lambda: fused_attn_output_residual(x, r, w, out=r),
        "rms_norm": lambda: rms_norm(r, norm_w, 1e-6),
        "torch.empty_like": lambda: torch.empty_like(r),
    }
    for fast in (True, False):
        runtime.FAST_LAUNCH = fast
        for name, fn in cases.items():
            print(f"{'fast' if fast else 'jit '} {name:<22} {host_us(fn):6.1f} us per call")
    runtime.FAST_LAUNCH = True
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        fused_attn_output_residual(x, r, w, out=r)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
