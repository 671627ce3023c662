"""RMSNorm + linear in one launch: ``out = RMSNorm(x, norm_weight) @ weight.T``.

The engine uses it for a decoder layer's input norm and q/k/v projection (weight = the merged
qkv_proj, N = (heads + 2 * kv_heads) * head_dim, K = hidden). The normalised activations are
rounded as transformers' Qwen3RMSNorm does (kernels/rms_norm.py): statistics in float32, the
normalised value rounded to x's dtype, multiplied by the norm weight and rounded again. The
product is accumulated in float32 and rounded once. At decode the saving is the norm's launch
and its round trip through memory, not bandwidth: the weight is read once either way.

Two paths, chosen per call by the launch configuration (tuned table for this GPU, else a
heuristic on M, the number of rows):

- ``gemv`` (decode, small M): the Triton kernel below, one program per [BLOCK_M, BLOCK_N]
  output tile. It computes its rows' RMS statistics over the whole of K itself (x is small
  and sits in L2, so every program re-reading it is cheap), then normalises each x chunk on
  the fly and reduces it against the weight tile: a float32 multiply-reduce, or ``tl.dot`` on
  16-row tiles. On Hopper it uses programmatic dependent launch (PDL): it lets the next
  kernel launch at once and loads its weight tile (the whole K slice in the common case) and
  the norm weight before waiting for the previous kernel, which may still be writing x.
- ``cublas`` (prefill, larger M): the unfused launches, ``kernels.rms_norm.rms_norm`` then
  ``F.linear``. At prefill sizes cuBLAS's GEMM is faster than any Triton tiling here, and the
  norm (one read and one write of x) is negligible next to the GEMM, so fusing buys nothing.

Under the Triton interpreter (CPU) blocks are large, because the interpreter pays per program
and per loop iteration, and bf16/fp16 operands are upcast before ``tl.dot`` (the
interpreter's bf16 dot is wrong).

The helpers, configuration and checks it shares with kernels/rms_norm_swiglu.py are in
kernels/gemv.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import gemv
from kernels.gemv import accumulate, load_norm_weight, load_weight_tile, load_x, normalise, row_rstd
from kernels.rms_norm import rms_norm_reference

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_linear_kernel(
    x_ptr, nw_ptr, w_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_nw, stride_wn, stride_wk, stride_om, stride_on, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """Program (n, m) computes out[m-tile, n-tile] = RMSNorm(x[m-tile]) @ W[n-tile].T.

    With USE_PDL the next kernel may launch at once; this program issues its first weight
    tile and norm-weight chunk (weights are never written by the previous kernel) before
    gdc_wait, and reads x, which that kernel may write, only after it.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w = load_weight_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk, USE_DOT)
    nw = load_norm_weight(nw_ptr, offs_k, K, stride_nw)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
    rstd = row_rstd(x, x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate(acc, normalise(x, rstd, nw), w, USE_DOT, UPCAST_DOT, IEEE_FP32)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # none when one tile covers K
        offs_kk = k0 + tl.arange(0, BLOCK_K)
        wk = load_weight_tile(w_ptr, offs_n, offs_kk, N, K, stride_wn, stride_wk, USE_DOT)
        nwk = load_norm_weight(nw_ptr, offs_kk, K, stride_nw)
        xk = load_x(x_ptr, offs_m, offs_kk, M, K, stride_xm, stride_xk)
        acc = accumulate(acc, normalise(xk, rstd, nwk), wk, USE_DOT, UPCAST_DOT, IEEE_FP32)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
    )


# Kernels that issue global loads (the weights) before their PDL wait.
READS_BEFORE_WAIT = ("_rms_norm_linear_kernel",)

# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


KERNEL = "rms_norm_linear"
Config = gemv.Config  # its launch configuration (kernels/gemv.py)
# Weight rows per output column: the tuned table is keyed by the weight's [N, K].
ROWS_PER_OUTPUT = 1


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype) -> Config:
    """A sound configuration for any shape when no tuned one applies."""
    return gemv.norm_gemv_heuristic(M, N, K, dtype, tiles=1)


def select_config(M: int, N: int, K: int, dtype: torch.dtype) -> Config:
    """The configuration a call uses: a forced one (tuning.use_config), else this GPU's
    tuned table (keyed by weight [N, K]), else the heuristic."""
    return gemv.select_config(KERNEL, Config, heuristic_config, M, N, K, dtype)


# The tuner's search space (profiling/tune.py).
tuning_candidates = gemv.norm_gemv_candidates


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``RMSNorm(x, norm_weight, eps) @ weight.T`` in one launch.

    x [..., K], norm_weight [K], weight [N, K] (nn.Linear layout), one dtype (bf16, fp16 or
    fp32); returns [..., N]. The norm is rounded as transformers rounds it; the product is
    accumulated in float32 and rounded once. Inputs may have any strides; ``out`` (a new
    tensor, contiguous in its last dim, viewable as [rows, N]) must not overlap an input. An
    empty batch returns an empty result without a launch. Every call checks its inputs
    (errors name the argument).

    On Hopper the GEMV path is launched with programmatic dependent launch: it reads
    ``weight`` and ``norm_weight`` before waiting for the kernel launched just before it, so
    they must not be written by that kernel, as inference weights are not.
    """
    N = gemv.check_norm_gemv_inputs(
        x, norm_weight, weight, eps, out, weight_name="weight", gated=False
    )
    return gemv.launch_norm_gemv(
        _rms_norm_linear_kernel, x, norm_weight, weight, eps, out, N, select_config,
        lambda normed, o2: torch.mm(normed, weight.t(), out=o2), weight_name="weight",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------


def rms_norm_linear_reference(
    x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The ops the fusion replaces: RMSNorm (transformers' rounding), then F.linear, in x's
    dtype."""
    return F.linear(rms_norm_reference(x, norm_weight, eps), weight)


def rms_norm_float64(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float64 on upcast inputs, no intermediate rounding."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()


def rms_norm_linear_float64(
    x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The formula in float64 on upcast inputs, no intermediate rounding (returns float64)."""
    return rms_norm_float64(x, norm_weight, eps) @ weight.double().T
