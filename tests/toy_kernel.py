"""residual + scale * o in one launch, accumulated in float32 and rounded once."""

import torch
import triton
import triton.language as tl

from kernels.launch_checks import check_runnable_device, check_same_dtype, check_tensor


@triton.jit
def _scaled_add_kernel(r_ptr, o_ptr, out_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (r + scale * o).to(out_ptr.dtype.element_ty), mask=mask)


def scaled_add(residual, o, scale=1.0):
    check_tensor("residual", residual)
    check_runnable_device("residual", residual)
    check_tensor("o", o, device=residual.device)
    check_same_dtype("residual", residual, o=o)
    if o.shape != residual.shape:
        raise ValueError(f"o has shape {tuple(o.shape)}; expected {tuple(residual.shape)}")
    residual, o = residual.contiguous(), o.contiguous()
    out = torch.empty_like(residual)
    n = residual.numel()
    _scaled_add_kernel[(triton.cdiv(n, 4096),)](residual, o, out, n, scale, BLOCK=4096)
    return out


def scaled_add_reference(residual, o, scale=1.0):
    return torch.add(residual, o, alpha=scale)


def scaled_add_float64(residual, o, scale=1.0):
    return residual.double() + scale * o.double()
