"""SiLU(gate) * up kernel vs float64 and the torch reference."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, assert_close_to_reference

from kernels.silu_mul import silu_mul, silu_mul_reference


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 3072), (5, 2 * 96), (2, 3, 2 * 100)], ids=str)
def test_silu_mul(shape, dtype_name, device):
    gate_up = (2 * torch.randn(shape, device=device)).to(DTYPES[dtype_name])
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), device=device).to(gate_up.dtype)
    got = silu_mul(gate_up, out=out)
    assert got is out
    assert_close_to_reference(
        got,
        silu_mul_reference(gate_up),
        silu_mul_reference(gate_up.double()),
        what=f"silu_mul {shape} {dtype_name}",
    )


def test_errors_name_the_argument(device):
    gate_up = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="gate_up has shape"):
        silu_mul(torch.randn(4, 63, device=device))
    with pytest.raises(TypeError, match="gate_up has dtype"):
        silu_mul(gate_up.int())
    with pytest.raises(ValueError, match="out has shape"):
        silu_mul(gate_up, out=torch.empty(4, 64, device=device))
    with pytest.raises(TypeError, match="out has dtype"):
        silu_mul(gate_up, out=torch.empty(4, 32, device=device, dtype=torch.float16))
