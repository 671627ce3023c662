"""Numerics of linear_residual (``residual_weight * residual + x @ weight.T``) against float64
and the unfused torch path (F.linear, then an add), held to profiling.numerics.judge.

Every case draws fresh inputs (seeded per test, base seed in the header), poisons the output
with NaN, and checks every element. The GPU runner runs the whole grid; on CPU (Triton
interpreter, which pays per program and per loop iteration) the large Qwen3 shapes run only
at a few M and the ragged shapes over the whole M range.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import tuning
from kernels.fused_attn_output import fused_attn_output_residual
from kernels.linear_residual import (
    KERNEL,
    Config,
    linear_residual,
    linear_residual_float64,
    linear_residual_reference,
    select_config,
)
from profiling.numerics import NumericsResult, judge, tf32_off

ACC_FACTOR = 8  # float32 accumulation-order allowance: 8 x eps32 x sqrt(K x sum of squares)
EPS32 = 2.0**-24


def draw(lead, N, K, dtype, device):
    """Qwen-like inputs: x ~ N(0, 1), residual ~ N(0, 1), weight ~ 0.02 N(0, 1)."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    x = torch.randn(*lead, K, device=device).to(dtype)
    residual = torch.randn(*lead, N, device=device).to(dtype)
    weight = (0.02 * torch.randn(N, K, device=device)).to(dtype)
    return x, residual, weight


def check(fn, x, residual, weight, residual_weight=1.0, *, in_place=False) -> NumericsResult:
    """Call ``fn(x, residual, weight, residual_weight, out=buffer)`` into a NaN-poisoned
    buffer (with ``in_place``: a copy of the residual passed as residual and out) and judge the
    result against linear_residual_float64 and linear_residual_reference."""
    K = x.shape[-1]
    ref64 = linear_residual_float64(x, residual, weight, residual_weight)
    with tf32_off():
        unfused = linear_residual_reference(x, residual, weight, residual_weight)
    x64, w64 = x.double(), weight.double()
    acc_allowance = ACC_FACTOR * EPS32 * torch.sqrt(K * ((x64 * x64) @ (w64 * w64).T))
    if in_place:
        buffer = residual.clone()
        got = fn(x, buffer, weight, residual_weight, out=buffer)
    else:
        buffer = torch.full_like(residual, float("nan"))
        got = fn(x, residual, weight, residual_weight, out=buffer)
    assert got.data_ptr() == buffer.data_ptr(), "the result is not the out buffer"
    rows = math.prod(x.shape[:-1])
    return judge(f"{KERNEL}.out", got, ref64, unfused, rows=rows, acc_allowance=acc_allowance)


def _assert_ok(result: NumericsResult, context: str) -> None:
    assert result.ok, f"{context}: {result.summary()}"


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
# The M values each shape runs at on CPU: large N*K only at decode-like M (the 0.6B shape on
# both sides of the interpreter's multiply-reduce / tl.dot switch above M=16); the rest of the
# grid is GPU-only.
CPU_M_VALUES = {
    "qwen3-0.6b": (1, 7, 64),
    "qwen3-1.7b": (2,),
    "qwen3-4b": (1,),
    "qwen3-8b": (),
    "ragged-1001x1537": (1, 16, 64),
    "ragged-77x333": (1, 2, 7, 16, 64, 333),
}


def _case(M, shape_name, dtype_name):
    N, K = SHAPES[shape_name]
    marks = [] if M in CPU_M_VALUES[shape_name] else [pytest.mark.gpu]
    return pytest.param(
        M, N, K, DTYPES[dtype_name], id=f"M{M}-{shape_name}-{dtype_name}", marks=marks
    )


GRID = [_case(M, s, d) for s in SHAPES for M in M_VALUES for d in DTYPES]


@pytest.mark.parametrize(("M", "N", "K", "dtype"), GRID)
def test_numerics_grid(M, N, K, dtype, device):
    x, r, w = draw(M, N, K, dtype, device)
    result = check(linear_residual, x, r, w)
    _assert_ok(result, f"M={M} N={N} K={K} {select_config(M, N, K, dtype)}")


@pytest.mark.parametrize("residual_weight", [1.0, 0.5, 0.0, -2.0])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("M", [1, 64])
def test_residual_weight(M, dtype, residual_weight, device):
    x, r, w = draw(M, 1001, 1537, dtype, device)
    result = check(linear_residual, x, r, w, residual_weight)
    _assert_ok(result, f"M={M} residual_weight={residual_weight}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("M", [1, 16, 333])
def test_in_place(M, dtype, device):
    """out=residual: the residual stream is updated where it lies."""
    x, r, w = draw(M, 1024, 2048, dtype, device)
    result = check(linear_residual, x, r, w, 0.5, in_place=True)
    _assert_ok(result, f"in place, M={M}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (4, 1), (2, 37)])
def test_batch_seq_layout(batch, seq, dtype, device):
    """[batch, seq, K] inputs give [batch, seq, N] outputs."""
    x, r, w = draw((batch, seq), 1024, 2048, dtype, device)
    result = check(linear_residual, x, r, w)
    _assert_ok(result, f"[{batch}, {seq}, K]")
    assert linear_residual(x, r, w).shape == (batch, seq, 1024)


def test_check_catches_a_perturbation_of_1e_2(device):
    """The tolerance is tight enough to see a 1e-2 error (the gate's planted regression)."""

    def perturbed(x, r, w, rw=1.0, *, out=None):
        out = linear_residual(x, r, w, rw, out=out)
        return out.add_(1e-2 * torch.randn_like(out))

    for dtype in DTYPES.values():
        x, r, w = draw(7, 1024, 2048, dtype, device)
        assert check(linear_residual, x, r, w).ok, dtype  # the unperturbed kernel passes
        assert not check(perturbed, x, r, w).ok, dtype


def test_check_catches_an_unwritten_element(device):
    """A kernel that skips the last row leaves NaN poison: the check must see it."""

    def skips_last_row(x, r, w, rw=1.0, *, out=None):
        linear_residual(x[:-1], r[:-1], w, rw, out=out[:-1])
        return out

    x, r, w = draw(7, 77, 333, torch.float32, device)
    result = check(skips_last_row, x, r, w)
    assert not result.ok and "NaN" in result.summary(), result.summary()


@pytest.mark.parametrize(
    ("M", "dtype"),
    [(1, torch.bfloat16), (7, torch.float16), (64, torch.float32)],
    ids=["M1-bf16", "M7-fp16", "M64-fp32"],
)
def test_fused_attn_output_residual_is_linear_residual(M, dtype, device):
    """The attention block's name for the fusion computes exactly what linear_residual does."""
    x, r, w = draw(M, 1001, 1537, dtype, device)
    result = check(fused_attn_output_residual, x, r, w, 0.5)
    _assert_ok(result, "fused_attn_output_residual")
    expected = linear_residual(x, r, w, 0.5)
    assert torch.equal(fused_attn_output_residual(x, r, w, 0.5), expected)
    in_place = r.clone()
    fused_attn_output_residual(x, in_place, w, 0.5, out=in_place)
    assert torch.equal(in_place, expected)


PATH_VARIANTS = {
    "gemv-multiply-reduce": Config("gemv", 8, 16, 64),
    "gemv-multiply-reduce-splitk3": Config("gemv", 8, 16, 64, split_k=3),
    "gemv-dot": Config("gemv", 16, 16, 32, num_stages=2, dot=True),
    "gemv-dot-splitk4": Config("gemv", 16, 16, 32, num_stages=2, split_k=4, dot=True),
    # PDL is used where it is supported (compiled, Hopper+) and ignored elsewhere.
    "gemv-pdl-splitk2": Config("gemv", 4, 32, 128, pdl=True, split_k=2),
    "gemv-pdl-dot": Config("gemv", 16, 32, 64, pdl=True, dot=True),
    "cublas": Config("cublas"),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("variant", PATH_VARIANTS)
def test_every_path_variant(variant, dtype, device):
    """Each code path (multiply-reduce, tl.dot, split-K with last-arrival reduction, PDL,
    cuBLAS addmm) forced through tuning.use_config on a ragged shape with several row tiles;
    called three times in a row, because the split-K arrival counters must reset themselves
    between calls."""
    config = PATH_VARIANTS[variant]
    N, K = 77, 333
    with tuning.use_config(KERNEL, config):
        assert select_config(7, N, K, dtype) == config
        for M in (7, 20, 3):
            x, r, w = draw(M, N, K, dtype, device)
            result = check(linear_residual, x, r, w, 0.5)
            _assert_ok(result, f"{variant} M={M} N={N} K={K}")
    assert tuning.override(KERNEL) is None  # the forced configuration ends with the block
