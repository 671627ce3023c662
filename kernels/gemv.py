"""The GEMV base shared by the kernels that multiply a few rows by a weight in one launch:
kernels/linear_residual.py, kernels/rms_norm_linear.py and kernels/rms_norm_swiglu.py.

Each of them has two paths, chosen per call by its launch configuration: ``gemv`` (decode,
small M: its Triton kernel) and ``cublas`` (prefill: cuBLAS's GEMM). Here:

- ``Config``, one launch configuration, and ``select_config``: a forced one
  (``kernels.tuning.use_config``), else this GPU's tuned table, else the kernel's heuristic;
- ``launch_options``: the constexprs and launch options a configuration compiles to;
- the ``@triton.jit`` helpers the kernels share: the weight tile load, the tensor-core dot and
  the multiply-reduce, and the RMSNorm prologue of the two norm kernels, with their heuristic,
  candidate configurations, grid and input checks.

A kernel module built on this base exports ``KERNEL`` (its table's name), ``Config``,
``heuristic_config``, ``select_config``, ``tuning_candidates(M, N, K)`` (the tuner's search
space) and ``ROWS_PER_OUTPUT`` (weight rows per output column: its table is keyed by
``weight rows / ROWS_PER_OUTPUT`` x K).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import torch
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
from kernels.rms_norm import rms_norm
from kernels.runtime import INTERPRETING, pdl_options, pdl_supported

# Untuned shapes take the Triton GEMV path up to this many rows, cuBLAS above (the norm kernels'
# heuristic).
GEMV_MAX_M = 16
# GPU heuristic: elements of the multiply-reduce's [BLOCK_M, BLOCK_N, BLOCK_K] products a
# program holds at once (all its weight tiles together), so that registers do not spill.
_GPU_TILE_BUDGET = 16384
# Shared memory for tl.dot's operand tiles: within an A100's 164 KB and an H100's 227 KB.
_GPU_DOT_SMEM = 160 * 1024
# The interpreter rejects tiles over 2**20 elements (a multiply-reduce's 3-D product counts).
_INTERPRETER_MAX_TILE = 1 << 20

# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration.

    ``path`` "gemv": the Triton kernel; ``dot`` picks tl.dot (blocks >= 16) over a float32
    multiply-reduce, ``pdl`` programmatic dependent launch (Hopper; ignored elsewhere).
    ``path`` "cublas": the kernel's cuBLAS path (the other fields are unused). A kernel with
    more knobs subclasses it (kernels/linear_residual.py: ``split_k``).
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


def select_config(
    kernel: str,
    config_type: type[Config],
    heuristic: Callable[[int, int, int, torch.dtype], Config],
    M: int,
    N: int,
    K: int,
    dtype: torch.dtype,
) -> Config:
    """The configuration a call of ``kernel`` uses: a forced one (tuning.use_config), else this
    GPU's tuned table (keyed by N x K), else ``heuristic(M, N, K, dtype)``."""
    forced = tuning.override(kernel)
    if forced is not None:
        return forced
    fields = tuning.tuned(kernel, N, K, dtype, M)
    return config_type.from_json(fields) if fields else heuristic(M, N, K, dtype)


def launch_options(cfg: Config, dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
    """(constexprs, launch options) of a GEMV kernel launched with ``cfg`` on ``dtype`` inputs."""
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
    return constexprs, options


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------
# Each helper has exactly one return, at its end: Triton 3.6 does not end a function at a
# return inside a constexpr branch.


@triton.jit
def mma(acc, a, b, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr):
    """acc + a @ b on the tensor cores; fp32 exact (ieee), bf16 upcast under the interpreter."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_FP32:  # noqa: SIM108  (constexpr branch: only one dot is compiled)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def load_weight_tile(w_ptr, offs_n, offs_k, N, k_end, stride_wn, stride_wk, USE_DOT: tl.constexpr):
    """W[offs_n, offs_k]: as [BLOCK_K, BLOCK_N] (transposed) for tl.dot, else [BLOCK_N, BLOCK_K]."""
    mask_n = offs_n < N
    mask_k = offs_k < k_end
    if USE_DOT:
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
    else:
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )
    return w


@triton.jit
def accumulate(acc, a, w, USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr):
    """acc + a @ (weight tile).T in float32; a [BLOCK_M, BLOCK_K] in the input dtype."""
    if USE_DOT:
        acc = mma(acc, a, w, UPCAST_DOT, IEEE_FP32)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


# --------------------------------------------------------------------------------------------
# The RMSNorm prologue (kernels/rms_norm_linear.py, kernels/rms_norm_swiglu.py)
# --------------------------------------------------------------------------------------------


@triton.jit
def load_norm_weight(nw_ptr, offs_k, K, stride_nw):
    return tl.load(nw_ptr + offs_k * stride_nw, mask=offs_k < K, other=0.0)


@triton.jit
def load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk):
    """x[offs_m, offs_k] in float32, 0 outside (padding adds nothing to the statistics)."""
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
        other=0.0,
    )
    return x.to(tl.float32)


@triton.jit
def row_rstd(x0, x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x**2) + eps) per row, in float32. ``x0`` is the rows' first BLOCK_K
    chunk, already loaded; the loop runs only when one chunk does not cover K."""
    sq = tl.sum(x0 * x0, axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        xk = load_x(x_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, stride_xk)
        sq += tl.sum(xk * xk, axis=1)
    return 1.0 / tl.sqrt(sq / K + eps)


@triton.jit
def normalise(x, rstd, nw):
    """transformers' rounding: x * rstd rounded to the input dtype (nw's), times the norm
    weight in float32, rounded again. Returns the input dtype (the dot's operand)."""
    normed = (x * rstd[:, None]).to(nw.dtype).to(tl.float32)
    return (normed * nw.to(tl.float32)[None, :]).to(nw.dtype)


def norm_gemv_heuristic(M: int, N: int, K: int, dtype: torch.dtype, tiles: int) -> Config:
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


def norm_gemv_candidates(M: int, N: int, K: int) -> list[Config]:
    """The tuner's search space for the norm kernels at M rows, N output columns, K."""
    out = [Config("cublas")] if M >= 16 else []
    block_k = triton.next_power_of_2(K)
    if M <= 4:
        for bn, warps in itertools.product((1, 2, 4, 8), (4, 8)):
            if M * bn * block_k <= 16384:
                out.append(Config("gemv", triton.next_power_of_2(M), bn, block_k, warps, pdl=True))
    if M >= 2:
        for bn, warps, bk in itertools.product((16, 32), (4, 8), (256, 512, 1024)):
            if bk <= block_k:
                out.append(Config("gemv", 16, bn, bk, warps, pdl=True, dot=True))
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything about a norm-GEMV launch that depends only on (M, N, K, dtype, device,
    config)."""

    grid: tuple[int, int]
    constexprs: dict
    options: dict


@functools.lru_cache(maxsize=1024)
def norm_gemv_plan(
    M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, cfg: Config
) -> Plan:
    """``N``: output columns (the grid's first axis)."""
    constexprs, options = launch_options(cfg, dtype, device)
    return Plan((cdiv(N, cfg.BLOCK_N), cdiv(M, cfg.BLOCK_M)), constexprs, options)


def check_norm_gemv_inputs(
    x, norm_weight, weight, eps, out, *, weight_name: str, gated: bool, x_name: str = "x"
):
    """Raise an error naming the argument unless the norm kernels can take these inputs;
    returns the output width (weight's rows, or half of them when ``gated``: gate rows, then
    up). ``x_name``: the caller's name for x."""
    wn, xn = weight_name, x_name
    check_tensor(xn, x, last_dim_contiguous=False)
    check_runnable_device(xn, x)
    check_tensor("norm_weight", norm_weight, dim=1, device=x.device, last_dim_contiguous=False)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{wn} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{wn} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(weight.shape)}"
        )
    check_tensor(wn, weight, device=x.device, last_dim_contiguous=False)
    check_same_dtype(xn, x, norm_weight=norm_weight, **{wn: weight})
    rows, K = weight.shape
    if K == 0:
        raise ValueError(f"{wn} has K=0 input features; expected K >= 1")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(
            f"{xn} has shape {tuple(x.shape)} but {wn} is [N={rows}, K={K}]: expected "
            f"{xn}[..., {K}]"
        )
    if norm_weight.shape[0] != K:
        raise ValueError(
            f"norm_weight has shape {tuple(norm_weight.shape)}; expected [{K}] ({xn}'s last dim)"
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
        check_same_dtype(xn, x, out=out)
        expected = (*x.shape[:-1], n_out)
        if tuple(out.shape) != expected:
            raise ValueError(
                f"out has shape {tuple(out.shape)}; expected {expected} ({xn}'s leading dims, "
                f"then {'half of ' if gated else ''}{wn}'s rows)"
            )
        if 0 in out.stride() and out.numel() > 1:
            raise ValueError("out has a zero stride (an expanded tensor): rows would overlap")
        for name, t in ((xn, x), ("norm_weight", norm_weight), (wn, weight)):
            if overlaps(out, t):
                raise ValueError(f"out overlaps {name}: pass a new tensor")
    return n_out


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied only if its last dim is strided (the unfused Triton launches need it)."""
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def launch_norm_gemv(
    kernel, x, norm_weight, weight, eps, out, n_out: int, select, unfused, *, weight_name: str
) -> torch.Tensor:
    """One call of a norm kernel on checked inputs (check_norm_gemv_inputs): ``n_out`` output
    columns, the configuration from ``select(M, n_out, K, dtype)``. The ``gemv`` path launches
    ``kernel`` (the @triton.jit function); the ``cublas`` path normalises with
    kernels.rms_norm and calls ``unfused(normed, out_rows)`` for the rest."""
    K = weight.shape[1]
    if out is None:
        out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, K)  # a copy only when the leading dims cannot be flattened
    o2 = rows_view("out", out, n_out)
    M = x2.shape[0]
    cfg = select(M, n_out, K, x.dtype)
    if cfg.path == "cublas":
        unfused(rms_norm(unit_last(x2), unit_last(norm_weight), eps), o2)
        return out
    check_32bit_indexing(x=x2, **{weight_name: weight}, out=o2)
    plan = norm_gemv_plan(M, n_out, K, x.dtype, x.device, cfg)
    kernel[plan.grid](
        x2, norm_weight, weight, o2, M, n_out, K,
        *x2.stride(), norm_weight.stride(0), *weight.stride(), *o2.stride(), eps,
        **plan.constexprs, **plan.options,
    )  # fmt: skip
    return out
