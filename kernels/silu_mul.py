"""SiLU(gate) * up in one launch, reading the merged gate_up projection's output.

    gate_up [..., 2*I] = [gate | up]  ->  out [..., I] = silu(gate) * up

Computed in float32 and rounded once (transformers rounds silu(gate) to the input dtype before
multiplying: within one ulp of this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_checks import (
    check_runnable_device,
    check_same_dtype,
    check_tensor,
    rows_view,
)
from kernels.runtime import INTERPRETING, pdl_options, pdl_supported

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    M,
    I,
    stride_gm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # the next kernel may launch now; gate_up is the previous kernel's output
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    gate_ptrs = gate_up_ptr + rows[:, None] * stride_gm + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + I, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` -> [..., I]; one launch."""
    check_tensor("gate_up", gate_up)
    check_runnable_device("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(
            f"gate_up has shape {tuple(gate_up.shape)}; expected [..., 2*I] (gate, then up)"
        )
    I = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], I)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    else:
        check_tensor("out", out, device=gate_up.device)
        check_same_dtype("gate_up", gate_up, out=out)
        if tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected {shape}")
    if out.numel() == 0:
        return out
    g2 = rows_view("gate_up", gate_up, 2 * I)
    o2 = rows_view("out", out, I)
    M = g2.shape[0]
    if INTERPRETING:
        # The interpreter pays per program: whole rows, many per program.
        block_i = triton.next_power_of_2(I)
        block_m = min(triton.next_power_of_2(M), max(1, 65536 // block_i))
    else:
        block_i, block_m = min(1024, triton.next_power_of_2(I)), 1
    grid = (triton.cdiv(M, block_m), triton.cdiv(I, block_i))
    use_pdl = pdl_supported(gate_up.device)
    _silu_mul_kernel[grid](
        g2,
        o2,
        M,
        I,
        g2.stride(0),
        o2.stride(0),
        BLOCK_M=block_m,
        BLOCK_I=block_i,
        USE_PDL=use_pdl,
        num_warps=4,
        **pdl_options(use_pdl),
    )
    return out


# --------------------------------------------------------------------------------------------
# Torch reference (transformers' Qwen3MLP)
# --------------------------------------------------------------------------------------------


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
