"""RMSNorm + gate/up + SiLU*up kernel vs float64 and the unfused torch ops (rms_norm_reference,
F.linear, silu_mul_reference)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, assert_close_to_reference, swiglu_magnitude

from kernels import gemv, tuning
from kernels import rms_norm_swiglu as module
from kernels.rms_norm_swiglu import (
    KERNEL,
    Config,
    heuristic_config,
    rms_norm_swiglu,
    rms_norm_swiglu_float64,
    rms_norm_swiglu_reference,
    select_config,
)

EPS = 1e-6
# Ragged on purpose: K is no power of two, I (INTER, the output width) no multiple of any
# block.
INTER, K = 50, 96


def _inputs(lead, i, k, dtype, device):
    """Model-scale values (never zeros): activations ~N(0, 1), weights ~N(0, 0.02), norm
    weights away from 1 so that a norm weight applied wrongly (or not at all) shows."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    x = torch.randn(*lead, k, device=device).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(k, device=device)).to(dtype)
    gate_up_weight = (0.02 * torch.randn(2 * i, k, device=device)).to(dtype)
    return x, norm_weight, gate_up_weight


def _nan_out(x, gate_up_weight):
    shape = (*x.shape[:-1], gate_up_weight.shape[0] // 2)
    return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)


def _check(got, x, norm_weight, gate_up_weight, what):
    assert_close_to_reference(
        got,
        rms_norm_swiglu_reference(x, norm_weight, gate_up_weight, EPS),
        rms_norm_swiglu_float64(x, norm_weight, gate_up_weight, EPS),
        what=what,
        magnitude=swiglu_magnitude(x, norm_weight, gate_up_weight, EPS),
    )


def _run_and_check(x, norm_weight, gate_up_weight, what):
    out = _nan_out(x, gate_up_weight)  # every element must be written
    got = rms_norm_swiglu(x, norm_weight, gate_up_weight, EPS, out=out)
    assert got is out
    _check(got, x, norm_weight, gate_up_weight, what)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8, 16, 40])
def test_rows(M, dtype_name, device):
    x, norm_weight, gate_up_weight = _inputs(M, INTER, K, DTYPES[dtype_name], device)
    _run_and_check(x, norm_weight, gate_up_weight, f"rms_norm_swiglu M={M} I={INTER} {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_leading_dims(dtype_name, device):
    x, norm_weight, gate_up_weight = _inputs((2, 5), INTER, K, DTYPES[dtype_name], device)
    _run_and_check(x, norm_weight, gate_up_weight, f"rms_norm_swiglu [2, 5, {K}] {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("M", [1, 8])
def test_qwen3_0_6b_mlp_shape(M, dtype_name, device):
    # Qwen3-0.6B: hidden 1024, intermediate 3072.
    x, norm_weight, gate_up_weight = _inputs(M, 3072, 1024, DTYPES[dtype_name], device)
    _run_and_check(
        x, norm_weight, gate_up_weight, f"rms_norm_swiglu Qwen3-0.6B MLP M={M} {dtype_name}"
    )


def test_strided_inputs(device):
    """Row strides that differ from K, a strided norm weight and a transposed weight."""
    x_big, nw_big, _ = _inputs(5, INTER, 2 * K, torch.float32, device)
    w_t = (0.02 * torch.randn(K, 2 * INTER, device=device)).t()  # [2I, K] with K-stride 2I
    x, norm_weight = x_big[:, :K], nw_big[::2]
    _run_and_check(x, norm_weight, w_t, "rms_norm_swiglu strided inputs")


def test_gate_and_up_rows_are_not_swapped(device):
    """silu(g) * u is not symmetric in g and u: a kernel that pairs the halves the wrong way
    round fails (checked against the same comparison as every other test)."""
    x, norm_weight, gate_up_weight = _inputs(4, INTER, K, torch.float32, device)
    swapped = torch.cat(gate_up_weight.chunk(2)[::-1])
    got = rms_norm_swiglu(x, norm_weight, swapped, EPS)
    with pytest.raises(AssertionError, match="elements off by more than"):
        _check(got, x, norm_weight, gate_up_weight, "planted: gate and up swapped")


CONFIGS = {
    "reduce-whole-K": Config("gemv", BLOCK_M=4, BLOCK_N=8, BLOCK_K=128),
    "reduce-K-loop": Config("gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_K=32),
    "reduce-K-loop-pdl": Config("gemv", BLOCK_M=2, BLOCK_N=32, BLOCK_K=64, pdl=True),
    "dot-whole-K": Config("gemv", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, dot=True),
    "dot-K-loop-pdl": Config("gemv", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, pdl=True, dot=True),
    "cublas": Config("cublas"),
}


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_path(config, dtype_name, device):
    """Each launch variant, forced: ragged M, I and K against every block shape (the K loop
    runs where BLOCK_K < K; pdl=True is ignored where PDL is unsupported)."""
    x, norm_weight, gate_up_weight = _inputs(5, INTER, K, DTYPES[dtype_name], device)
    with tuning.use_config(KERNEL, CONFIGS[config]):
        assert select_config(5, INTER, K, x.dtype) == CONFIGS[config]
        _run_and_check(x, norm_weight, gate_up_weight, f"rms_norm_swiglu {config} {dtype_name}")


@pytest.mark.parametrize("interpreting", [True, False], ids=["interpreted", "compiled"])
def test_heuristic_configs(interpreting, monkeypatch):
    """The heuristic's choices on both backends (the GPU's are only computed here): each
    program holds a gate and an up tile, so registers and shared memory count both."""
    monkeypatch.setattr(gemv, "INTERPRETING", interpreting)
    for dtype in DTYPES.values():
        for i, k in ((3072, 1024), (12288, 4096), (INTER, K)):
            for M in (1, 2, 3, 4, 8, 16, 17, 2048):
                cfg = heuristic_config(M, i, k, dtype)
                m, bn, bk = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
                if interpreting:
                    assert cfg.path == "gemv" and cfg.dot == (M > 16)
                    assert (max(m, bn) * bk if cfg.dot else m * bn * bk) <= 2**20
                elif M > 16:
                    assert cfg.path == "cublas"
                else:
                    assert cfg.path == "gemv" and cfg.pdl and cfg.dot == (M > 1)
                    if cfg.dot:
                        assert (m + 2 * bn) * bk * dtype.itemsize <= 160 * 1024
                    else:
                        assert 2 * m * bn * bk <= 16384


def test_errors_name_the_argument(device):
    x, norm_weight, gate_up_weight = _inputs(4, 32, 64, torch.float32, device)
    with pytest.raises(ValueError, match=r"x has shape \(4, 64\) but gate_up_weight is"):
        rms_norm_swiglu(x, norm_weight, gate_up_weight[:, :32], EPS)
    with pytest.raises(ValueError, match="norm_weight has shape"):
        rms_norm_swiglu(x, norm_weight[:32], gate_up_weight, EPS)
    with pytest.raises(ValueError, match="gate_up_weight has 63 rows, an odd number"):
        rms_norm_swiglu(x, norm_weight, gate_up_weight[:63], EPS)
    with pytest.raises(ValueError, match="gate_up_weight must be 2-D"):
        rms_norm_swiglu(x, norm_weight, gate_up_weight[0], EPS)
    with pytest.raises(TypeError, match="gate_up_weight has dtype torch.float16 but x has"):
        rms_norm_swiglu(x, norm_weight, gate_up_weight.half(), EPS)
    with pytest.raises(TypeError, match="norm_weight has dtype torch.bfloat16 but x has"):
        rms_norm_swiglu(x, norm_weight.bfloat16(), gate_up_weight, EPS)
    for eps in (0.0, -1e-6, 0, float("inf")):
        with pytest.raises(ValueError, match="eps"):
            rms_norm_swiglu(x, norm_weight, gate_up_weight, eps)
    with pytest.raises(ValueError, match="out overlaps x"):
        rms_norm_swiglu(x, norm_weight, gate_up_weight, EPS, out=x[:, :32])
    shared = torch.randn(4 * 32, device=device)  # out [4, 32] over norm_weight's memory
    with pytest.raises(ValueError, match="out overlaps norm_weight"):
        rms_norm_swiglu(x, shared[:64], gate_up_weight, EPS, out=shared.view(4, 32))
    with pytest.raises(ValueError, match=r"out has shape \(4, 64\); expected \(4, 32\)"):
        rms_norm_swiglu(x, norm_weight, gate_up_weight, EPS, out=torch.empty_like(x))
    with pytest.raises(ValueError, match="out must be contiguous in its last dimension"):
        rms_norm_swiglu(
            x, norm_weight, gate_up_weight, EPS, out=torch.empty(32, 4, device=device).t()
        )


def test_empty_batch_launches_nothing(device, monkeypatch):
    monkeypatch.setattr(module, "_rms_norm_swiglu_kernel", None)  # a launch would fail
    x, norm_weight, gate_up_weight = _inputs((3, 0), INTER, K, torch.bfloat16, device)
    got = rms_norm_swiglu(x, norm_weight, gate_up_weight, EPS)
    assert got.shape == (3, 0, INTER) and got.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_planted_error_is_caught(dtype_name, device):
    """The comparison must fail for a result that leaves the norm weight out (any dtype), and
    in fp32 for one scaled by 1%."""
    x, norm_weight, gate_up_weight = _inputs(8, INTER, K, DTYPES[dtype_name], device)
    no_norm_weight = rms_norm_swiglu(x, torch.ones_like(norm_weight), gate_up_weight, EPS)
    with pytest.raises(AssertionError, match="elements off by more than"):
        _check(no_norm_weight, x, norm_weight, gate_up_weight, "planted: norm weight left out")
    if dtype_name == "fp32":
        scaled = rms_norm_swiglu(x, norm_weight, gate_up_weight, EPS) * 1.01
        with pytest.raises(AssertionError, match="elements off by more than"):
            _check(scaled, x, norm_weight, gate_up_weight, "planted: 1% scale")
