"""RMSNorm + linear kernel vs float64 and the unfused torch ops (rms_norm_reference, F.linear)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, assert_close_to_reference
from triton import next_power_of_2 as triton_next_pow2

from kernels import gemv, tuning
from kernels import rms_norm_linear as module
from kernels.rms_norm_linear import (
    KERNEL,
    Config,
    heuristic_config,
    rms_norm_float64,
    rms_norm_linear,
    rms_norm_linear_float64,
    rms_norm_linear_reference,
    select_config,
)

EPS = 1e-6
# Ragged on purpose: K is no power of two, N no multiple of any block.
N, K = 100, 96


def _inputs(lead, n, k, dtype, device):
    """Model-scale values (never zeros): activations ~N(0, 1), weights ~N(0, 0.02), norm
    weights away from 1 so that a norm weight applied wrongly (or not at all) shows."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    x = torch.randn(*lead, k, device=device).to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(k, device=device)).to(dtype)
    weight = (0.02 * torch.randn(n, k, device=device)).to(dtype)
    return x, norm_weight, weight


def _magnitude(x, norm_weight, weight):
    """Sum of the dot's absolute terms, |normed| @ |W|.T (float64): ulps count at this size."""
    return rms_norm_float64(x, norm_weight, EPS).abs() @ weight.double().abs().T


def _nan_out(x, weight):
    shape = (*x.shape[:-1], weight.shape[0])
    return torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)


def _check(got, x, norm_weight, weight, what):
    assert_close_to_reference(
        got,
        rms_norm_linear_reference(x, norm_weight, weight, EPS),
        rms_norm_linear_float64(x, norm_weight, weight, EPS),
        what=what,
        magnitude=_magnitude(x, norm_weight, weight),
    )


def _run_and_check(x, norm_weight, weight, what):
    out = _nan_out(x, weight)  # every element must be written
    got = rms_norm_linear(x, norm_weight, weight, EPS, out=out)
    assert got is out
    _check(got, x, norm_weight, weight, what)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("M", [1, 3, 8, 16, 40])
def test_rows(M, dtype_name, device):
    x, norm_weight, weight = _inputs(M, N, K, DTYPES[dtype_name], device)
    _run_and_check(x, norm_weight, weight, f"rms_norm_linear M={M} N={N} K={K} {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_leading_dims(dtype_name, device):
    x, norm_weight, weight = _inputs((2, 5), N, K, DTYPES[dtype_name], device)
    _run_and_check(x, norm_weight, weight, f"rms_norm_linear [2, 5, {K}] {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("M", [1, 8])
def test_qwen3_0_6b_qkv_shape(M, dtype_name, device):
    # Qwen3-0.6B: hidden 1024, (16 + 2 * 8) heads x 128 = 4096 q/k/v columns.
    x, norm_weight, weight = _inputs(M, 4096, 1024, DTYPES[dtype_name], device)
    _run_and_check(x, norm_weight, weight, f"rms_norm_linear Qwen3-0.6B qkv M={M} {dtype_name}")


def test_strided_inputs(device):
    """Row strides that differ from K, a strided norm weight and a transposed weight."""
    x_big, nw_big, _ = _inputs(5, N, 2 * K, torch.float32, device)
    w_t = (0.02 * torch.randn(K, N, device=device)).t()  # [N, K] with K-stride N
    x, norm_weight = x_big[:, :K], nw_big[::2]
    _run_and_check(x, norm_weight, w_t, "rms_norm_linear strided inputs")


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
    """Each launch variant, forced: ragged M, N and K against every block shape (the K loop
    runs where BLOCK_K < K; pdl=True is ignored where PDL is unsupported)."""
    x, norm_weight, weight = _inputs(5, N, K, DTYPES[dtype_name], device)
    with tuning.use_config(KERNEL, CONFIGS[config]):
        assert select_config(5, N, K, x.dtype) == CONFIGS[config]
        _run_and_check(x, norm_weight, weight, f"rms_norm_linear {config} {dtype_name}")


@pytest.mark.parametrize("interpreting", [True, False], ids=["interpreted", "compiled"])
def test_heuristic_configs(interpreting, monkeypatch):
    """The heuristic's choices on both backends (the GPU's are only computed here): the path
    by M, tiles within the interpreter's limit, registers and shared memory on the GPU."""
    monkeypatch.setattr(gemv, "INTERPRETING", interpreting)
    for dtype in DTYPES.values():
        for n, k in ((4096, 1024), (6144, 4096), (N, K)):
            for M in (1, 2, 3, 4, 8, 16, 17, 2048):
                cfg = heuristic_config(M, n, k, dtype)
                assert cfg == Config.from_json(cfg.to_json())
                m, bn, bk = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
                if interpreting:
                    assert cfg.path == "gemv" and cfg.dot == (M > gemv.GEMV_MAX_M)
                    assert (max(m, bn) * bk if cfg.dot else m * bn * bk) <= 2**20
                elif M > gemv.GEMV_MAX_M:
                    assert cfg.path == "cublas"
                else:
                    assert cfg.path == "gemv" and cfg.pdl and cfg.dot == (M > 1)
                    if cfg.dot:
                        assert (m + bn) * bk * dtype.itemsize <= 160 * 1024
                    else:
                        assert m * bn * bk <= 16384 and bk >= min(triton_next_pow2(k), 4096)


def test_config_is_validated():
    with pytest.raises(ValueError, match="path"):
        Config("triton")
    with pytest.raises(ValueError, match="BLOCK_K must be a power of two"):
        Config(BLOCK_K=96)
    with pytest.raises(ValueError, match="tl.dot needs"):
        Config(BLOCK_M=1, BLOCK_N=16, BLOCK_K=16, dot=True)


def test_errors_name_the_argument(device):
    x, norm_weight, weight = _inputs(4, 64, 64, torch.float32, device)
    with pytest.raises(ValueError, match=r"x has shape \(4, 64\) but weight is \[N=64, K=32\]"):
        rms_norm_linear(x, norm_weight, weight[:, :32], EPS)
    with pytest.raises(ValueError, match="norm_weight has shape"):
        rms_norm_linear(x, norm_weight[:32], weight, EPS)
    with pytest.raises(ValueError, match="norm_weight must be 1-D"):
        rms_norm_linear(x, norm_weight[None], weight, EPS)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        rms_norm_linear(x, norm_weight, weight[0], EPS)
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16 but x has"):
        rms_norm_linear(x, norm_weight, weight.bfloat16(), EPS)
    with pytest.raises(TypeError, match="norm_weight has dtype"):
        rms_norm_linear(x, norm_weight.half(), weight, EPS)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rms_norm_linear(x.long(), norm_weight, weight, EPS)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        rms_norm_linear(x, norm_weight, weight.tolist(), EPS)
    for eps in (0.0, -1e-6, 1, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            rms_norm_linear(x, norm_weight, weight, eps)
    with pytest.raises(ValueError, match="out overlaps x"):
        rms_norm_linear(x, norm_weight, weight, EPS, out=x)
    with pytest.raises(ValueError, match="out overlaps weight"):
        rms_norm_linear(x, norm_weight, weight, EPS, out=weight[:4])
    with pytest.raises(ValueError, match="out has shape"):
        rms_norm_linear(x, norm_weight, weight, EPS, out=torch.empty(4, 63, device=device))
    with pytest.raises(TypeError, match="out has dtype"):
        rms_norm_linear(x, norm_weight, weight, EPS, out=torch.empty(4, 64, device=device).half())


def test_empty_batch_launches_nothing(device, monkeypatch):
    monkeypatch.setattr(module, "_rms_norm_linear_kernel", None)  # a launch would fail
    x, norm_weight, weight = _inputs((0, 3), N, K, torch.float32, device)
    assert rms_norm_linear(x, norm_weight, weight, EPS).shape == (0, 3, N)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_planted_error_is_caught(dtype_name, device):
    """The comparison must fail for a result that leaves the norm weight out (any dtype), and
    in fp32 for one scaled by 1% (in bf16 that is within 3 ulps of the dot's term size)."""
    x, norm_weight, weight = _inputs(8, N, K, DTYPES[dtype_name], device)
    no_norm_weight = rms_norm_linear(x, torch.ones_like(norm_weight), weight, EPS)
    with pytest.raises(AssertionError, match="elements off by more than"):
        _check(no_norm_weight, x, norm_weight, weight, "planted: norm weight left out")
    if dtype_name == "fp32":
        scaled = rms_norm_linear(x, norm_weight, weight, EPS) * 1.01
        with pytest.raises(AssertionError, match="elements off by more than"):
            _check(scaled, x, norm_weight, weight, "planted: 1% scale")
