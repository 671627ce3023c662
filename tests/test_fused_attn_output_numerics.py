"""D2 numerics of fused_attn_output_residual against float64 and the unfused torch path.

Every case draws fresh inputs (seeded per test, base seed in the header), poisons the output
with NaN, and checks every element. The GPU runner runs the whole grid; CPU CI runs the cases
whose M*N*K fits the interpreter's budget (the interpreter pays per program and iteration).
"""

from __future__ import annotations

import pytest
import torch

from kernels.fused_attn_output import (
    KernelConfig,
    fused_attn_output_residual,
    select_config,
    use_config,
)
from profiling.numerics import check_fused_numerics, draw_inputs

M_VALUES = [1, 2, 7, 16, 64, 333, 2048]
# (N, K): Qwen3 o_proj shapes, then ragged ones (N, K not multiples of any block size).
SHAPES = {
    "qwen3-0.6b": (1024, 2048),
    "qwen3-1.7b": (2048, 2048),
    "qwen3-4b": (2560, 4096),
    "qwen3-8b": (4096, 4096),
    "ragged-1001x1537": (1001, 1537),
    "ragged-77x333": (77, 333),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest M*N*K interpreted on CPU: M=333 at the 0.6B shape (~0.5 s a call).
CPU_MAX_WORK = 333 * 1024 * 2048


def _case(M, shape_name, dtype_name):
    N, K = SHAPES[shape_name]
    marks = [pytest.mark.gpu] if M * N * K > CPU_MAX_WORK else []
    return pytest.param(
        M, N, K, DTYPES[dtype_name], id=f"M{M}-{shape_name}-{dtype_name}", marks=marks
    )


GRID = [_case(M, s, d) for s in SHAPES for M in M_VALUES for d in DTYPES]


def _assert_ok(result, context):
    assert result.ok, f"{context}: {result.summary()}"


@pytest.mark.parametrize(("M", "N", "K", "dtype"), GRID)
def test_numerics_grid(M, N, K, dtype, device):
    x, r, w = draw_inputs(M, N, K, dtype, device)
    result = check_fused_numerics(fused_attn_output_residual, x, r, w)
    _assert_ok(result, f"M={M} N={N} K={K} path={select_config(M, N, K, dtype).path}")


@pytest.mark.parametrize("residual_weight", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("M", [1, 7, 64])
def test_residual_weight(M, dtype, residual_weight, device):
    x, r, w = draw_inputs(M, 1001, 1537, dtype, device)
    result = check_fused_numerics(fused_attn_output_residual, x, r, w, residual_weight)
    _assert_ok(result, f"residual_weight={residual_weight}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("M", [1, 16, 333])
def test_in_place(M, dtype, device):
    """out=residual: the residual stream is updated where it lies."""
    x, r, w = draw_inputs(M, 1024, 2048, dtype, device)
    result = check_fused_numerics(fused_attn_output_residual, x, r, w, 0.5, in_place=True)
    _assert_ok(result, "in place")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (4, 1), (2, 37)])
def test_batch_seq_layout(batch, seq, dtype, device):
    """[batch, seq, heads*head_dim] inputs give [batch, seq, hidden] outputs."""
    x, r, w = draw_inputs((batch, seq), 1024, 2048, dtype, device)
    result = check_fused_numerics(fused_attn_output_residual, x, r, w)
    _assert_ok(result, f"[{batch}, {seq}, K]")
    assert fused_attn_output_residual(x, r, w).shape == (batch, seq, 1024)


def test_check_catches_a_perturbation_of_1e_2(device):
    """The tolerance is tight enough to see a 1e-2 error (the gate's planted regression)."""

    def perturbed(x, r, w, rw=1.0, *, out=None):
        out = fused_attn_output_residual(x, r, w, rw, out=out)
        return out.add_(1e-2 * torch.randn_like(out))

    for dtype in DTYPES.values():
        x, r, w = draw_inputs(7, 1024, 2048, dtype, device)
        assert not check_fused_numerics(perturbed, x, r, w).ok, dtype


def test_check_catches_an_unwritten_element(device):
    """A kernel that skips the last row leaves NaN poison: the check must see it."""

    def skips_last_row(x, r, w, rw=1.0, *, out=None):
        fused_attn_output_residual(x[:-1], r[:-1], w, rw, out=out[:-1])
        return out

    x, r, w = draw_inputs(7, 77, 333, torch.float32, device)
    result = check_fused_numerics(skips_last_row, x, r, w)
    assert not result.ok and "NaN" in result.summary()


PATH_VARIANTS = {
    "gemv-fma": KernelConfig("gemv", 8, 16, 64),
    "gemv-fma-splitk3": KernelConfig("gemv", 8, 16, 64, split_k=3),
    "gemv-dot-splitk4": KernelConfig("gemv", 16, 16, 32, num_stages=2, split_k=4, dot=True),
    "gemm": KernelConfig("gemm", 16, 32, 32, num_stages=2),
    # TMA descriptors need 16-byte aligned row strides: K=333 is not, and falls back to the
    # pointer GEMM with the same tiles; the 16-aligned shape below takes the TMA kernel.
    "gemm-tma": KernelConfig("gemm", 16, 32, 32, num_stages=2, tma=True),
}
# (N, K) per variant: ragged everywhere, 16-byte aligned rows where TMA needs them.
VARIANT_SHAPES = {"gemm-tma": [(77, 333), (72, 336)]}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", PATH_VARIANTS)
def test_every_path_variant(variant, dtype, device):
    """Each code path (multiply-reduce, split-K with last-arrival reduction, tl.dot, tiled
    GEMM) on ragged shapes with several row tiles; called three times in a row, because the
    split-K arrival counters must reset themselves between calls."""
    with use_config(PATH_VARIANTS[variant]):
        for N, K in VARIANT_SHAPES.get(variant, [(77, 333)]):
            for M in (7, 20, 3):
                x, r, w = draw_inputs(M, N, K, dtype, device)
                result = check_fused_numerics(fused_attn_output_residual, x, r, w, 0.5)
                _assert_ok(result, f"{variant} M={M} N={N} K={K}")
