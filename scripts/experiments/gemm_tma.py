"""Experiment: does a TMA (tensor-descriptor) GEMM + residual epilogue beat the cp.async
pointer GEMM of kernels/fused_attn_output.py at large M? Prints µs per layer (chain method)."""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from profiling.kernel_timing import ChainInputs, GraphChain, addmm_step, fused_step
from profiling.numerics import check_fused_numerics, draw_inputs


@triton.jit
def _gemm_tma_kernel(
    x_desc, w_desc, r_desc, o_desc, M, N, K, rw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k])
        b = w_desc.load([off_n, k])
        acc = tl.dot(a, b.T, acc)
    r = r_desc.load([off_m, off_n])
    out = acc + rw * r.to(tl.float32)
    o_desc.store([off_m, off_n], out.to(o_desc.dtype))


def tma_fn(cfg):
    bm, bn, bk, warps, stages = cfg

    def fn(x, r, w, rw=1.0, *, out=None):
        out = torch.empty_like(r) if out is None else out
        M, K = x.shape
        N = w.shape[0]
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _gemm_tma_kernel[grid](
            TensorDescriptor.from_tensor(x, [bm, bk]),
            TensorDescriptor.from_tensor(w, [bn, bk]),
            TensorDescriptor.from_tensor(r, [bm, bn]),
            TensorDescriptor.from_tensor(out, [bm, bn]),
            M, N, K, float(rw),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return out

    return fn


def main():
    shapes = [(1024, 2048), (4096, 4096)]
    tma_cfgs = [
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
        (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (128, 64, 64, 4, 4),
    ]  # fmt: skip
    for N, K in shapes:
        for M in (128, 512, 2048):
            inputs = ChainInputs.draw(M, N, K)
            row = {}
            row["addmm_"] = statistics.median(GraphChain(addmm_step, inputs, 4).us_per_call(11))
            row["fused"] = statistics.median(GraphChain(fused_step, inputs, 4).us_per_call(11))
            for cfg in tma_cfgs:
                fn = tma_fn(cfg)
                x, r, w = draw_inputs(M, N, K, torch.bfloat16, "cuda")
                try:
                    res = check_fused_numerics(fn, x, r, w, 0.5)
                    us = statistics.median(
                        GraphChain(lambda x, r, w, fn=fn: fn(x, r, w), inputs, 4).us_per_call(11)
                    )
                except Exception as exc:
                    print(f"N={N} K={K} M={M} tma{cfg}: {type(exc).__name__} {exc}"[:200])
                    continue
                row[f"tma{cfg}"] = us
                if not res.ok:
                    print("NUMERICS FAIL", cfg, res.summary())
            best = min((v, k) for k, v in row.items() if k.startswith("tma"))
            print(
                f"N={N} K={K} M={M}: addmm_ {row['addmm_']:.2f} fused(ptr) {row['fused']:.2f}"
                f" best tma {best[0]:.2f} {best[1]}",
                flush=True,
            )
            for k, v in sorted(row.items(), key=lambda kv: kv[1]):
                print(f"    {k}: {v:.2f}")


if __name__ == "__main__":
    main()
