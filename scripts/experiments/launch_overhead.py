"""Experiment: host time per eager call of the fused launcher vs F.linear + add (M=1, 0.6B
o_proj), with and without PDL, and where the fused call spends it (cProfile)."""

from __future__ import annotations

import cProfile
import dataclasses
import pstats
import time

import torch

from kernels.fused_attn_output import (
    fused_attn_output_residual,
    select_config,
    unfused_attn_output_residual,
    use_config,
)


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
    tuned = select_config(1, 1024, 2048, torch.bfloat16)
    print("tuned", tuned)
    print(f"unfused F.linear+add: {host_us(lambda: unfused_attn_output_residual(x, r, w)):.1f} us")
    print(f"fused (tuned): {host_us(lambda: fused_attn_output_residual(x, r, w)):.1f} us")
    for pdl in (False, True):
        with use_config(dataclasses.replace(tuned, pdl=pdl)):
            us = host_us(lambda: fused_attn_output_residual(x, r, w))
        print(f"fused pdl={pdl}: {us:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        fused_attn_output_residual(x, r, w)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
