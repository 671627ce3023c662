"""RMSNorm and residual-add + RMSNorm kernels vs float64 and the torch reference."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, assert_close_to_reference

from kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

SHAPES = [(1, 1024), (7, 64), (3, 5, 100), (2, 4096)]
EPS = 1e-6


def _inputs(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(shape, dtype_name, device):
    x, _, weight = _inputs(shape, DTYPES[dtype_name], device)
    out = torch.full_like(x, float("nan"))
    got = rms_norm(x, weight, EPS, out=out)
    assert got is out
    assert_close_to_reference(
        got,
        rms_norm_reference(x, weight, EPS),
        rms_norm_reference(x.double(), weight.double(), EPS),
        what=f"rms_norm {shape} {dtype_name}",
    )


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_updates_residual_in_place(shape, dtype_name, device):
    x, residual, weight = _inputs(shape, DTYPES[dtype_name], device)
    residual_before = residual.clone()
    out = torch.full_like(x, float("nan"))
    normed, summed = add_rms_norm(x, residual, weight, EPS, out=out)
    assert normed is out and summed is residual
    ref_normed, ref_summed = add_rms_norm_reference(x, residual_before, weight, EPS)
    exact_sum = x.double() + residual_before.double()
    assert_close_to_reference(summed, ref_summed, exact_sum, what="residual sum", ulps=1)
    # The norm is of the rounded sum (as the unfused model stores it).
    assert_close_to_reference(
        normed,
        ref_normed,
        rms_norm_reference(summed.double(), weight.double(), EPS),
        what=f"add_rms_norm {shape} {dtype_name}",
    )


def test_errors_name_the_argument(device):
    x, residual, weight = _inputs((4, 64), torch.float32, device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight[:32], EPS)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        rms_norm(x.long(), weight, EPS)
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        rms_norm(torch.randn(64, 4, device=device).t(), weight, EPS)
    with pytest.raises(TypeError, match="residual has dtype"):
        add_rms_norm(x, residual.double(), weight, EPS)
    with pytest.raises(ValueError, match="residual has shape"):
        add_rms_norm(x, residual[:2], weight, EPS)
    with pytest.raises(ValueError, match="out has shape"):
        rms_norm(x, weight, EPS, out=torch.empty(3, 64, device=device))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, weight, 0.0)


def test_empty_batch(device):
    x = torch.empty(0, 64, device=device)
    assert rms_norm(x, torch.ones(64, device=device), EPS).shape == (0, 64)
