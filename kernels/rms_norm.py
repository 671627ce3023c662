"""RMSNorm, and residual add + RMSNorm, in one launch each.

    rms_norm(x, w)               = w * x / sqrt(mean(x**2) + eps)
    add_rms_norm(x, residual, w): residual <- x + residual (in place), returns rms_norm(residual, w)

The add variant joins the MLP's residual add to the next layer's input norm (vLLM's
fused_add_rms_norm). The attention residual add is NOT fused here: it stays in the
o_proj_residual step, which is what the suite measures.

Rounding follows transformers' Qwen3RMSNorm so that bf16 results match it: the sum x+residual
is rounded to the stream dtype (as the unfused model stores it), the statistics are float32,
the normalised value is rounded to the input dtype before the weight multiplies it.
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

# Kernels that issue global loads before their PDL wait (checked on the compiled PTX).
READS_BEFORE_WAIT = ("_rms_norm_kernel",)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    stride_xm,
    stride_rm,
    stride_om,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Programmatic dependent launch (Hopper): the next kernel may launch now; this one reads
    # its weight before waiting for the previous kernel, whose output x is.
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + rows[:, None] * stride_rm + cols[None, :]
        summed = (x + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(
            residual_ptr.dtype.element_ty
        )
        tl.store(r_ptrs, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    normed = (x * rstd[:, None]).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_om + cols[None, :],
        (normed * w[None, :]).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _block_m(M: int, block_n: int) -> int:
    if INTERPRETING:
        # The interpreter pays per program: many rows per program.
        return min(triton.next_power_of_2(M), max(1, 65536 // block_n))
    return 1


def _launch(x, residual, weight, eps, out):
    check_tensor("x", x)
    check_runnable_device("x", x)
    check_tensor("weight", weight, dim=1, device=x.device)
    N = weight.shape[0]
    if x.dim() < 1 or x.shape[-1] != N:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., {N}] (weight's size)")
    if residual is not None:
        check_tensor("residual", residual, device=x.device)
        check_same_dtype("x", x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual has shape {tuple(residual.shape)}; expected x's {tuple(x.shape)}"
            )
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        check_tensor("out", out, device=x.device)
        check_same_dtype("x", x, out=out)
        if out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected x's {tuple(x.shape)}")
    if not isinstance(eps, float) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if x.numel() == 0:
        return out
    x2 = rows_view("x", x, N)
    r2 = rows_view("residual", residual, N) if residual is not None else x2
    o2 = rows_view("out", out, N)
    M = x2.shape[0]
    block_n = triton.next_power_of_2(N)
    block_m = _block_m(M, block_n)
    use_pdl = pdl_supported(x.device)
    _rms_norm_kernel[(triton.cdiv(M, block_m),)](
        x2,
        r2,
        weight,
        o2,
        M,
        N,
        x2.stride(0),
        r2.stride(0),
        o2.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        USE_PDL=use_pdl,
        num_warps=4 if block_n <= 2048 else 8,
        **pdl_options(use_pdl),
    )
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` [..., N] with ``weight`` [N]; one launch."""
    return _launch(x, None, weight, eps, out)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place), then RMSNorm of it; one launch. Returns (normed, residual)."""
    if residual is None:
        raise TypeError("residual must be a torch.Tensor, got None (use rms_norm)")
    return _launch(x, residual, weight, eps, out), residual


# --------------------------------------------------------------------------------------------
# Torch references (transformers' Qwen3RMSNorm rounding)
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the model dtypes; float64 stays float64 (the tests' exact reference)."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    acc = _compute_dtype(x.dtype)
    xa = x.to(acc)
    normed = (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.to(acc) * normed.to(acc)).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = _compute_dtype(x.dtype)
    summed = (x.to(acc) + residual.to(acc)).to(x.dtype)
    return rms_norm_reference(summed, weight, eps), summed
