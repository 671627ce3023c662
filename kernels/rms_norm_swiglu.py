"""RMSNorm + gate/up projection + SiLU(gate) * up in one launch.

    normed = RMSNorm(x, norm_weight)                       (transformers' rounding)
    gate, up = normed @ W[:I].T, normed @ W[I:].T          (float32, not rounded)
    out = silu(gate) * up                                  (float32, rounded once)

``W`` = gate_up_weight [2I, K] is the engine's merged layout: the gate rows, then the up rows.
The engine uses it for a decoder layer's post-attention norm and the MLP's first half; the
down projection follows in kernels/linear_residual.py. At decode it saves two launches (the
norm and silu_mul) and the [M, 2I] intermediate; the weight is read once either way.

Two paths, chosen per call by the launch configuration (tuned table for this GPU, else a
heuristic on M, the number of rows), as in kernels/rms_norm_linear.py, with which this file
shares its Triton helpers, configuration class and checks (kernels/gemv.py):

- ``gemv`` (decode, small M): the Triton kernel below. Program j of the N axis owns output
  columns j-tile and computes both the gate rows j and the up rows I + j of that tile, so the
  SiLU * up epilogue needs nothing from other programs. Both weight tiles and the norm weight
  are loaded before the PDL wait (Hopper); x, which the previous kernel may write, after.
- ``cublas`` (prefill, larger M): the unfused launches, ``kernels.rms_norm.rms_norm``,
  ``F.linear`` then ``kernels.silu_mul.silu_mul``. At prefill sizes cuBLAS's GEMM is faster
  than any Triton tiling here, and the norm and SiLU * up (a few passes over activations) are
  negligible next to the GEMM. This path rounds gate and up to x's dtype, as the unfused
  model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import gemv
from kernels.gemv import accumulate, load_norm_weight, load_weight_tile, load_x, normalise, row_rstd
from kernels.rms_norm import rms_norm_reference
from kernels.rms_norm_linear import rms_norm_float64
from kernels.silu_mul import silu_mul, silu_mul_reference

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_swiglu_kernel(
    x_ptr, nw_ptr, w_ptr, out_ptr, M, I, K,
    stride_xm, stride_xk, stride_nw, stride_wn, stride_wk, stride_om, stride_on, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, m) computes out[m-tile, n-tile] = silu(g) * u, with g and u the norm of
    x[m-tile] times gate rows n-tile and up rows I + n-tile, both kept in float32.

    With USE_PDL the next kernel may launch at once; this program issues its first gate and
    up tiles and the norm-weight chunk (weights are never written by the previous kernel)
    before gdc_wait, and reads x, which that kernel may write, only after it.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    up_ptr = w_ptr + I * stride_wn
    wg = load_weight_tile(w_ptr, offs_n, offs_k, I, K, stride_wn, stride_wk, USE_DOT)
    wu = load_weight_tile(up_ptr, offs_n, offs_k, I, K, stride_wn, stride_wk, USE_DOT)
    nw = load_norm_weight(nw_ptr, offs_k, K, stride_nw)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
    rstd = row_rstd(x, x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K)
    a = normalise(x, rstd, nw)
    gate = accumulate(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a, wg, USE_DOT, UPCAST_DOT, IEEE_FP32
    )
    up = accumulate(
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), a, wu, USE_DOT, UPCAST_DOT, IEEE_FP32
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):  # none when one tile covers K
        offs_kk = k0 + tl.arange(0, BLOCK_K)
        wgk = load_weight_tile(w_ptr, offs_n, offs_kk, I, K, stride_wn, stride_wk, USE_DOT)
        wuk = load_weight_tile(up_ptr, offs_n, offs_kk, I, K, stride_wn, stride_wk, USE_DOT)
        nwk = load_norm_weight(nw_ptr, offs_kk, K, stride_nw)
        xk = load_x(x_ptr, offs_m, offs_kk, M, K, stride_xm, stride_xk)
        ak = normalise(xk, rstd, nwk)
        gate = accumulate(gate, ak, wgk, USE_DOT, UPCAST_DOT, IEEE_FP32)
        up = accumulate(up, ak, wuk, USE_DOT, UPCAST_DOT, IEEE_FP32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < I)[None, :],
    )


# Kernels that issue global loads (the weights) before their PDL wait.
READS_BEFORE_WAIT = ("_rms_norm_swiglu_kernel",)

# --------------------------------------------------------------------------------------------
# Launch configurations (Config: kernels/gemv.py's)
# --------------------------------------------------------------------------------------------


KERNEL = "rms_norm_swiglu"
Config = gemv.Config  # its launch configuration (kernels/gemv.py)
# Weight rows per output column (a gate and an up row): the tuned table is keyed by I x K.
ROWS_PER_OUTPUT = 2


def heuristic_config(M: int, I: int, K: int, dtype: torch.dtype) -> Config:
    """A sound configuration for any shape when no tuned one applies; ``I`` output columns
    (each program holds a gate and an up tile)."""
    return gemv.norm_gemv_heuristic(M, I, K, dtype, tiles=2)


def select_config(M: int, I: int, K: int, dtype: torch.dtype) -> Config:
    """The configuration a call uses: a forced one (tuning.use_config), else this GPU's
    tuned table (keyed by I x K, I the output width), else the heuristic."""
    return gemv.select_config(KERNEL, Config, heuristic_config, M, I, K, dtype)


# The tuner's search space (profiling/tune.py).
tuning_candidates = gemv.norm_gemv_candidates


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def rms_norm_swiglu(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_up_weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(g) * u`` with ``[g | u] = RMSNorm(x, norm_weight, eps) @ gate_up_weight.T``, in
    one launch.

    x [..., K], norm_weight [K], gate_up_weight [2I, K] (the gate rows, then the up rows),
    one dtype (bf16, fp16 or fp32); returns [..., I]. The norm is rounded as transformers
    rounds it; gate and up are accumulated in float32 and not rounded; SiLU * up is float32,
    rounded once. Inputs may have any strides; ``out`` (a new tensor, contiguous in its last
    dim, viewable as [rows, I]) must not overlap an input. An empty batch returns an empty
    result without a launch. Every call checks its inputs (errors name the argument).

    On Hopper the GEMV path is launched with programmatic dependent launch: it reads the
    weights before waiting for the kernel launched just before it, so they must not be
    written by that kernel, as inference weights are not.
    """
    weight = gate_up_weight
    I = gemv.check_norm_gemv_inputs(
        x, norm_weight, weight, eps, out, weight_name="gate_up_weight", gated=True
    )
    return gemv.launch_norm_gemv(
        _rms_norm_swiglu_kernel, x, norm_weight, weight, eps, out, I, select_config,
        lambda normed, o2: silu_mul(F.linear(normed, weight), out=o2),
        weight_name="gate_up_weight",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------


def rms_norm_swiglu_reference(
    x: torch.Tensor, norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The ops the fusion replaces: RMSNorm (transformers' rounding), F.linear, SiLU * up,
    in x's dtype."""
    return silu_mul_reference(F.linear(rms_norm_reference(x, norm_weight, eps), gate_up_weight))


def rms_norm_swiglu_float64(
    x: torch.Tensor, norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The formula in float64 on upcast inputs, no intermediate rounding (returns float64)."""
    gate, up = (rms_norm_float64(x, norm_weight, eps) @ gate_up_weight.double().T).chunk(2, -1)
    return F.silu(gate) * up
