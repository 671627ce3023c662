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

kernels/rms_norm_swiglu.py builds the MLP's norm + gate/up + SiLU*up on the pieces here.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import tuning
from kernels.launch_checks import (
    cdiv,
    check_32bit_indexing,
    check_runnable_device,
    check_same_dtype,
    check_tensor,
    next_pow2,
    overlaps,
    rows_view,
)
from kernels.linear_residual import _load_weight_tile, _mma
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.runtime import INTERPRETING, pdl_options, pdl_supported

KERNEL = "rms_norm_linear"
# Untuned shapes take the Triton GEMV path up to this many rows, cuBLAS above.
GEMV_MAX_M = 16
# GPU heuristic: elements of the multiply-reduce's [BLOCK_M, BLOCK_N, BLOCK_K] products a
# program holds at once (all its weight tiles together), so that registers do not spill.
_GPU_TILE_BUDGET = 16384
# Shared memory for tl.dot's operand tiles: within an A100's 164 KB and an H100's 227 KB.
_GPU_DOT_SMEM = 160 * 1024
# The interpreter rejects tiles over 2**20 elements (a multiply-reduce's 3-D product counts).
_INTERPRETER_MAX_TILE = 1 << 20

# --------------------------------------------------------------------------------------------
# Triton helpers (shared with kernels/rms_norm_swiglu.py)
# --------------------------------------------------------------------------------------------
# Each helper has exactly one return, at its end: Triton 3.6 does not end a function at a
# return inside a constexpr branch.


@triton.jit
def _load_norm_weight(nw_ptr, offs_k, K, stride_nw):
    return tl.load(nw_ptr + offs_k * stride_nw, mask=offs_k < K, other=0.0)


@triton.jit
def _load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk):
    """x[offs_m, offs_k] in float32, 0 outside (padding adds nothing to the statistics)."""
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
        other=0.0,
    )
    return x.to(tl.float32)


@triton.jit
def _row_rstd(x0, x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x**2) + eps) per row, in float32. ``x0`` is the rows' first BLOCK_K
    chunk, already loaded; the loop runs only when one chunk does not cover K."""
    sq = tl.sum(x0 * x0, axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        xk = _load_x(x_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, stride_xk)
        sq += tl.sum(xk * xk, axis=1)
    return 1.0 / tl.sqrt(sq / K + eps)


@triton.jit
def _normalise(x, rstd, nw):
    """transformers' rounding: x * rstd rounded to the input dtype (nw's), times the norm
    weight in float32, rounded again. Returns the input dtype (the dot's operand)."""
    normed = (x * rstd[:, None]).to(nw.dtype).to(tl.float32)
    return (normed * nw.to(tl.float32)[None, :]).to(nw.dtype)


@triton.jit
def _accumulate(
    acc, a, w, USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr
):
    """acc + a @ (weight tile).T in float32; a [BLOCK_M, BLOCK_K] in the input dtype."""
    if USE_DOT:
        acc = _mma(acc, a, w, UPCAST_DOT, IEEE_FP32)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_linear_kernel(
    x_ptr,
    nw_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_nw,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
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
    w = _load_weight_tile(w_ptr, offs_n, offs_k, N, K, stride_wn, stride_wk, USE_DOT)
    nw = _load_norm_weight(nw_ptr, offs_k, K, stride_nw)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = _load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
    rstd = _row_rstd(x, x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, _normalise(x, rstd, nw), w, USE_DOT, UPCAST_DOT, IEEE_FP32)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # none when one tile covers K
        offs_kk = k0 + tl.arange(0, BLOCK_K)
        wk = _load_weight_tile(w_ptr, offs_n, offs_kk, N, K, stride_wn, stride_wk, USE_DOT)
        nwk = _load_norm_weight(nw_ptr, offs_kk, K, stride_nw)
        xk = _load_x(x_ptr, offs_m, offs_kk, M, K, stride_xm, stride_xk)
        acc = _accumulate(acc, _normalise(xk, rstd, nwk), wk, USE_DOT, UPCAST_DOT, IEEE_FP32)
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
    )


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration.

    ``path`` "gemv": the Triton kernel; ``dot`` picks tl.dot (blocks >= 16) over a float32
    multiply-reduce, ``pdl`` programmatic dependent launch (Hopper; ignored elsewhere).
    ``path`` "cublas": the unfused launches (the other fields are unused).
    """

    path: str = "gemv"
    BLOCK_M: int = 1
    BLOCK_N: int = 1
    BLOCK_K: int = 1
    num_warps: int = 4
    num_stages: int = 1
    pdl: bool = False
    dot: bool = False

    def __post_init__(self):
        if self.path not in ("gemv", "cublas"):
            raise ValueError(f"Config.path must be 'gemv' or 'cublas', got {self.path!r}")
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"Config.{name} must be a power of two, got {value!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Config.num_stages must be >= 1, got {self.num_stages!r}")
        for name in ("pdl", "dot"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Config.{name} must be a bool, got {getattr(self, name)!r}")
        if self.dot and min(self.BLOCK_M, self.BLOCK_N, self.BLOCK_K) < 16:
            raise ValueError("Config: tl.dot needs BLOCK_M, BLOCK_N and BLOCK_K >= 16")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Config:
        return cls(**data)


def _heuristic(M: int, N: int, K: int, dtype: torch.dtype, tiles: int) -> Config:
    """Heuristic for N output columns over K, with ``tiles`` weight tiles per program (the
    swiglu kernel holds a gate and an up tile)."""
    k_pow2 = next_pow2(K)
    bucket = tuning.m_bucket(M)
    if INTERPRETING:
        # The interpreter pays per program and per loop iteration, not per byte: few, fat
        # programs, K in one chunk where the tile limit allows.
        block_n = min(256, next_pow2(N))
        if M <= GEMV_MAX_M:  # multiply-reduce: the [M, N, K] product is the big tile
            block_k = min(k_pow2, max(16, _INTERPRETER_MAX_TILE // (bucket * block_n)))
            return Config("gemv", bucket, block_n, block_k)
        block_n = max(16, block_n)
        block_k = max(16, min(k_pow2, _INTERPRETER_MAX_TILE // block_n))
        return Config("gemv", 64, block_n, block_k, dot=True)
    if M > GEMV_MAX_M:
        return Config("cublas")
    if M == 1:
        # Multiply-reduce over the whole row (K <= 4096, or as much as the register budget
        # allows): each program's whole weight slice is in flight before the PDL wait. Four
        # weight rows a program measured fastest (Qwen3-0.6B shapes, H100).
        block_n = 4
        block_k = min(k_pow2, 4096, _GPU_TILE_BUDGET // (tiles * block_n))
        return Config("gemv", 1, block_n, block_k, pdl=True)
    # 1 < M <= 16: tl.dot on [16, 32] tiles over up to 1024 of K (beyond that it loops).
    # Measured on the H100: faster than the multiply-reduce from M=2 on for swiglu and from
    # M=4 on for linear (at M=2-3 the two are within ~0.1 us there).
    # tl.dot stages its operands in shared memory: BLOCK_K shrinks until they fit (fp32
    # swiglu at 1024 would need 320 KB).
    block_m, block_n, block_k = 16, 32, max(16, min(k_pow2, 1024))
    while block_k > 16 and (block_m + tiles * block_n) * block_k * dtype.itemsize > _GPU_DOT_SMEM:
        block_k //= 2
    return Config("gemv", block_m, block_n, block_k, num_warps=8, pdl=True, dot=True)


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype) -> Config:
    """A sound configuration for any shape when no tuned one applies."""
    return _heuristic(M, N, K, dtype, tiles=1)


def select_config(M: int, N: int, K: int, dtype: torch.dtype) -> Config:
    """The configuration a call uses: a forced one (tuning.use_config), else this GPU's
    tuned table (keyed by weight [N, K]), else the heuristic."""
    forced = tuning.override(KERNEL)
    if forced is not None:
        return forced
    fields = tuning.tuned(KERNEL, N, K, dtype, M)
    return Config.from_json(fields) if fields else heuristic_config(M, N, K, dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about a GEMV launch that depends only on (M, N, K, dtype, device, config)."""

    grid: tuple[int, int]
    constexprs: dict
    options: dict


@functools.lru_cache(maxsize=1024)
def _plan(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, cfg: Config) -> _Plan:
    """``N``: output columns (the grid's first axis)."""
    use_pdl = cfg.pdl and pdl_supported(device)
    constexprs = {
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_N": cfg.BLOCK_N,
        "BLOCK_K": cfg.BLOCK_K,
        "USE_DOT": cfg.dot,
        "UPCAST_DOT": INTERPRETING and dtype != torch.float32,
        "IEEE_FP32": dtype == torch.float32,
        "USE_PDL": use_pdl,
    }
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **pdl_options(use_pdl)}
    return _Plan((cdiv(N, cfg.BLOCK_N), cdiv(M, cfg.BLOCK_M)), constexprs, options)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _check_inputs(x, norm_weight, weight, eps, out, *, weight_name: str, gated: bool) -> int:
    """Raise an error naming the argument unless the kernels can take these inputs; returns
    the output width (weight's rows, or half of them when ``gated``: gate rows, then up)."""
    wn = weight_name
    check_tensor("x", x, last_dim_contiguous=False)
    check_runnable_device("x", x)
    check_tensor("norm_weight", norm_weight, dim=1, device=x.device, last_dim_contiguous=False)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{wn} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{wn} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(weight.shape)}"
        )
    check_tensor(wn, weight, device=x.device, last_dim_contiguous=False)
    check_same_dtype("x", x, norm_weight=norm_weight, **{wn: weight})
    rows, K = weight.shape
    if K == 0:
        raise ValueError(f"{wn} has K=0 input features; expected K >= 1")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but {wn} is [N={rows}, K={K}]: expected x[..., {K}]"
        )
    if norm_weight.shape[0] != K:
        raise ValueError(
            f"norm_weight has shape {tuple(norm_weight.shape)}; expected [{K}] (x's last dim)"
        )
    if gated and rows % 2:
        raise ValueError(
            f"{wn} has {rows} rows, an odd number: expected [2*I, K], the gate rows then the "
            "up rows"
        )
    n_out = rows // 2 if gated else rows
    if not isinstance(eps, float) or not (0 < eps < math.inf):
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    if out is not None:
        check_tensor("out", out, device=x.device)
        check_same_dtype("x", x, out=out)
        expected = (*x.shape[:-1], n_out)
        if tuple(out.shape) != expected:
            raise ValueError(
                f"out has shape {tuple(out.shape)}; expected {expected} (x's leading dims, "
                f"then {'half of ' if gated else ''}{wn}'s rows)"
            )
        if 0 in out.stride() and out.numel() > 1:
            raise ValueError("out has a zero stride (an expanded tensor): rows would overlap")
        for name, t in (("x", x), ("norm_weight", norm_weight), (wn, weight)):
            if overlaps(out, t):
                raise ValueError(f"out overlaps {name}: pass a new tensor")
    return n_out


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied only if its last dim is strided (the unfused Triton launches need it)."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


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
    N = _check_inputs(x, norm_weight, weight, eps, out, weight_name="weight", gated=False)
    K = weight.shape[1]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, K)  # a copy only when the leading dims cannot be flattened
    o2 = rows_view("out", out, N)
    M = x2.shape[0]
    cfg = select_config(M, N, K, x.dtype)
    if cfg.path == "cublas":
        normed = rms_norm(_unit_last(x2), _unit_last(norm_weight), eps)
        torch.mm(normed, weight.t(), out=o2)
        return out
    check_32bit_indexing(x=x2, weight=weight, out=o2)
    plan = _plan(M, N, K, x.dtype, x.device, cfg)
    _rms_norm_linear_kernel[plan.grid](
        x2, norm_weight, weight, o2, M, N, K,
        *x2.stride(), norm_weight.stride(0), *weight.stride(), *o2.stride(), eps,
        **plan.constexprs, **plan.options,
    )  # fmt: skip
    return out


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
