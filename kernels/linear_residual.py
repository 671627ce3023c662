"""Linear + residual in one launch: ``out = residual_weight * residual + x @ weight.T``.

Accumulated in float32 and rounded once to the output dtype (docs/definitions.md, "Fused
kernel contract"). The engine uses it for two steps: ``o_proj_residual`` (the attention
output projection and the attention residual add) and ``down_proj_residual`` (the MLP's down
projection and the MLP residual add). At decode the saving is a launch and the intermediate
(~2 KB per layer for Qwen3-0.6B), not bandwidth: both paths read the same weight.

Two paths, chosen per call by the launch configuration (tuned table for this GPU, else a
heuristic on M, the number of rows):

- ``gemv`` (decode, small M): the Triton kernel below. Programs tile N finely and may split
  K (the last program to finish a tile reduces it: still one launch) so that every SM
  streams a slice of the weight; the dot is a float32 multiply-reduce or ``tl.dot`` on
  16-row tiles. On Hopper it uses programmatic dependent launch (PDL): it lets the next
  kernel launch at once, and loads its weight slice before waiting for the previous kernel,
  so its weight stream overlaps the tail of the kernel before it.
- ``cublas`` (prefill, larger M): ``torch.addmm(residual, x, weight.T)``, one cuBLAS GEMM
  with the residual added in its epilogue (beta = residual_weight). Measured on the H100,
  cuBLAS beats every Triton GEMM tiling tried from M=64 up (docs/notes.md).

Under the Triton interpreter (CPU) blocks are large, because the interpreter pays per program
and per loop iteration, and bf16 operands are upcast before ``tl.dot`` (the interpreter's bf16
dot is wrong: triton issue 11584).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import gemv, tuning
from kernels.gemv import load_weight_tile, mma
from kernels.launch_checks import (
    cdiv,
    check_32bit_indexing,
    check_backend_setting,
    check_no_grad,
    next_pow2,
    overlaps,
)
from kernels.runtime import INTERPRETING

KERNEL = "linear_residual"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Untuned shapes take the Triton GEMV path up to this many rows, cuBLAS above; from 5 rows
# cuBLAS also takes weights of this many elements or more (its GEMM streams a large weight
# faster than the GEMV's tl.dot tiles: on the H200 at M=8, 13.9 vs 16.8 µs at 4096 x 4096).
GEMV_MAX_M = 16
CUBLAS_MIN_WEIGHT = 1 << 23
# Weight rows per output column: the tuned table is keyed by the weight's [N, K].
ROWS_PER_OUTPUT = 1
# Kernels that issue global loads (the weights) before their PDL wait.
READS_BEFORE_WAIT = ("_gemv_residual_kernel",)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_residual(r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn):
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask)
    return r.to(tl.float32)


@triton.jit
def _store_out(acc, r, rw, out_ptr, offs_m, offs_n, M, N, stride_om, stride_on):
    """out = acc + rw * residual, rounded once to out's dtype."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
        (acc + rw * r).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _gemv_tile(
    acc, w, x_ptr, offs_m, offs_k, M, k_end, stride_xm, stride_xk,
    USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr,
):  # fmt: skip
    """acc + x[offs_m, offs_k] @ (weight tile).T"""
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
        mask=(offs_m < M)[:, None] & (offs_k < k_end)[None, :],
        other=0.0,
    )
    if USE_DOT:
        acc = mma(acc, x, w, UPCAST_DOT, IEEE_FP32)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _gemv_residual_kernel(
    x_ptr,
    w_ptr,
    r_ptr,
    out_ptr,
    partials_ptr,
    arrivals_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    residual_weight,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Small-M path: program (n, k, m) computes a [BLOCK_M, BLOCK_N] tile over one K slice.

    Narrow N tiles and SPLIT_K slices put enough programs (and weight bytes in flight) on
    every SM even at M=1. With SPLIT_K > 1 each program stores its float32 partial, and the
    last program to arrive at a tile (counted with an atomic) sums the partials, adds the
    residual and writes the output: still one launch, still rounded once. The arrival
    counter is reset by that last program, so no zero-fill launch is needed between calls.

    With USE_PDL (Hopper programmatic dependent launch) the next kernel is allowed to launch
    at once: its programs become resident and stream their own weights while this kernel
    runs. Each program issues its first weight tile (tuned configurations make it the whole
    K slice) BEFORE waiting for the previous kernel (gdc_wait; weights are never written by
    it), and the activations and the residual, which that kernel may have written, after.
    What is left after the wait is one round of loads that hit L2, the reduction, the store.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    w = load_weight_tile(w_ptr, offs_n, offs_k, N, k_end, stride_wn, stride_wk, USE_DOT)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    # The residual is loaded together with the activations, not after the reduction: one
    # memory latency less on the path that the next kernel waits for.
    r = _load_residual(r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _gemv_tile(
        acc, w, x_ptr, offs_m, offs_k, M, k_end, stride_xm, stride_xk,
        USE_DOT, UPCAST_DOT, IEEE_FP32,
    )  # fmt: skip
    for k0 in range(k_begin + BLOCK_K, k_end, BLOCK_K):  # none when one tile covers the slice
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = load_weight_tile(w_ptr, offs_n, offs_k, N, k_end, stride_wn, stride_wk, USE_DOT)
        acc = _gemv_tile(
            acc, w, x_ptr, offs_m, offs_k, M, k_end, stride_xm, stride_xk,
            USE_DOT, UPCAST_DOT, IEEE_FP32,
        )  # fmt: skip
    if SPLIT_K == 1:
        _store_out(acc, r, residual_weight, out_ptr, offs_m, offs_n, M, N, stride_om, stride_on)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        tile_partials = partials_ptr + tile * (SPLIT_K * BLOCK_M * BLOCK_N)
        offs_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(tile_partials + pid_k * (BLOCK_M * BLOCK_N) + offs_tile, acc)
        # Every thread's partial is stored before the (release) arrival is counted.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                # .cg: read from L2, where the other programs' partials are.
                total += tl.load(
                    tile_partials + s * (BLOCK_M * BLOCK_N) + offs_tile, cache_modifier=".cg"
                )
            _store_out(
                total, r, residual_weight, out_ptr, offs_m, offs_n, M, N, stride_om, stride_on
            )
            tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config(gemv.Config):
    """One launch configuration (kernels/gemv.py), and ``split_k``: K slices of the ``gemv``
    path, reduced by the last-arriving program."""

    split_k: int = 1

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"Config.split_k must be >= 1, got {self.split_k!r}")


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype) -> Config:
    """A sound configuration for any shape when no tuned one applies."""
    k_pow2 = next_pow2(K)
    bucket = tuning.m_bucket(M)
    if INTERPRETING:
        # The interpreter pays per program and per loop iteration: few, fat programs
        # (tiles stay under its 2**20-element limit).
        block_n = min(256, next_pow2(N))
        if M <= 16:  # multiply-reduce: the [M, N, K] product is the big tile
            return Config(
                "gemv", bucket, block_n, min(k_pow2, max(16, (1 << 20) // (bucket * block_n)))
            )
        return Config("gemv", 64, block_n, min(k_pow2, (1 << 20) // block_n), dot=True)
    if M > GEMV_MAX_M:
        return Config("cublas")
    if M > 4 and N * K >= CUBLAS_MIN_WEIGHT:
        return Config("cublas")
    if M == 1:
        # What tuning chose on the H100 and the H200 alike: the whole K row in one tile up to
        # 4096 columns (one slice: every weight byte in flight before the PDL wait), 2048-column
        # slices beyond; 2 output rows a program below N = 2048, 4 from there.
        block_k = k_pow2 if k_pow2 <= 4096 else 2048
        return Config("gemv", 1, 2 if N < 2048 else 4, block_k, pdl=True, split_k=cdiv(K, block_k))
    # Multiply-reduce up to M=4, tl.dot on [16, 32] tiles above; each program's K slice is
    # one tile.
    if M <= 4:
        block_k = min(k_pow2, 2048)
        return Config(
            "gemv", bucket, max(1, 8 // bucket), block_k, pdl=True, split_k=cdiv(k_pow2, block_k)
        )
    split_k = min(16, max(1, k_pow2 // 512))
    return Config(
        "gemv", 16, 32, max(16, cdiv(k_pow2, split_k)), pdl=True, split_k=split_k, dot=True
    )


def select_config(M: int, N: int, K: int, dtype: torch.dtype) -> Config:
    """The configuration a call uses: a forced one (tuning.use_config), else this GPU's
    tuned table, else the heuristic."""
    return gemv.select_config(KERNEL, Config, heuristic_config, M, N, K, dtype)


def tuning_candidates(M: int, N: int, K: int) -> list[Config]:
    """The tuner's search space at M rows (profiling/tune.py)."""
    out = [Config("cublas")] if M > 4 else []
    # K slices of 512-4096 columns, as many as cover K: K = 3072 splits 3 x 1024 or 6 x 512,
    # not 4 x 1024 with the last slice empty (or 2 x 2048 with a quarter of each tile masked).
    for slice_k in sorted({min(next_pow2(K), s) for s in (512, 1024, 2048, 4096)}):
        split = triton.cdiv(K, slice_k)
        if M <= 4:
            for bn, warps in itertools.product((1, 2, 4, 8), (4, 8)):
                if M * bn * slice_k <= 16384 and 128 <= triton.cdiv(N, bn) * split <= 8192:
                    out.append(Config("gemv", M, bn, slice_k, warps, pdl=True, split_k=split))
        if M >= 2 and slice_k >= 64:
            for bn, warps in itertools.product((16, 32, 64), (4, 8)):
                programs = triton.cdiv(N, bn) * split * triton.cdiv(M, 16)
                if 64 <= programs <= 2048 and bn * slice_k <= 32768 and 16 * slice_k <= 32768:
                    out.append(
                        Config("gemv", 16, bn, slice_k, warps, pdl=True, split_k=split, dot=True)
                    )
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about a GEMV launch that depends only on (M, N, K, dtype, device, config)."""

    grid: tuple[int, int, int]
    k_per_split: int
    constexprs: dict
    options: dict
    partials_size: tuple[int, int]  # (tiles, floats per tile) for the split-K buffers


@functools.lru_cache(maxsize=1024)
def _plan(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, cfg: Config) -> _Plan:
    n_tiles, m_tiles = cdiv(N, cfg.BLOCK_N), cdiv(M, cfg.BLOCK_M)
    k_per_split = cdiv(cdiv(K, cfg.split_k), cfg.BLOCK_K) * cfg.BLOCK_K
    split_k = cdiv(K, k_per_split)  # no empty slices
    constexprs, options = gemv.launch_options(cfg, dtype, device)
    constexprs["SPLIT_K"] = split_k
    partials = (n_tiles * m_tiles, split_k * cfg.BLOCK_M * cfg.BLOCK_N)
    return _Plan((n_tiles, split_k, m_tiles), k_per_split, constexprs, options, partials)


_split_k_state: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_k_buffers(device: torch.device, tiles: int, per_tile: int):
    """Float32 partials and int32 arrival counters for split-K, kept per device.

    The counters are zeroed once here and reset by the kernel itself after each tile, so
    calls need no zero-fill launch. Allocated generously on first (eager) use so that a CUDA
    graph captured later never allocates. Calls on one device must not run concurrently on
    two streams (they share these buffers).
    """
    partials, arrivals = _split_k_state.get(device, (None, None))
    if partials is None or partials.numel() < tiles * per_tile or arrivals.numel() < tiles:
        partials = torch.empty(max(tiles * per_tile, 1 << 20), dtype=torch.float32, device=device)
        arrivals = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
        _split_k_state[device] = (partials, arrivals)
    return partials, arrivals


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _check_inputs(x, residual, weight, residual_weight, out, names: tuple[str, str, str]) -> None:
    """Raise an error naming the argument (``names``: the caller's names for x, residual,
    weight) unless the kernel can take these inputs."""
    xn, rn, wn = names
    named = {xn: x, rn: residual, wn: weight}
    if out is not None:
        named["out"] = out
    check_backend_setting()
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_no_grad(name, t)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{xn} has dtype {x.dtype}; supported: bfloat16, float16, float32")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {xn} has {x.dtype}: {xn}, {rn}, {wn} and out "
                "must share one dtype"
            )
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(
                f"{name} is on {t.device} but {xn} is on {x.device}: all tensors must be on one "
                "device"
            )
    if x.device.type == "cuda" and INTERPRETING:
        raise RuntimeError(
            "the tensors are on CUDA but Triton runs interpreted (FUSIONGUARD_TRITON or "
            "TRITON_INTERPRET=1): unset it to run compiled"
        )
    if x.device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"{xn} is on {x.device}: compiled kernels need CUDA tensors (FUSIONGUARD_TRITON="
            "interpreted runs them on CPU)"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"{wn} must be 2-D [N, K] (nn.Linear layout), got shape {tuple(weight.shape)}"
        )
    N, K = weight.shape
    if K == 0:
        raise ValueError(f"{wn} has K=0 input features; expected K >= 1")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(
            f"{xn} has shape {tuple(x.shape)} but {wn} is [N={N}, K={K}]: expected {xn}[..., {K}]"
        )
    expected = (*x.shape[:-1], N)
    if tuple(residual.shape) != expected:
        raise ValueError(
            f"{rn} has shape {tuple(residual.shape)}; expected {expected} "
            f"({xn}'s leading dims, then {wn}'s N)"
        )
    if out is not None:
        if tuple(out.shape) != expected:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected {expected}")
        if 0 in out.stride() and out.numel() > 1:
            raise ValueError("out has a zero stride (an expanded tensor): rows would overlap")
        for name in (xn, wn):
            if overlaps(out, named[name]):
                raise ValueError(f"out overlaps {name}: only out={rn} may alias an input")
        same_view = out.data_ptr() == residual.data_ptr() and out.stride() == residual.stride()
        if overlaps(out, residual) and not same_view:
            raise ValueError(f"out partially overlaps {rn}: pass out={rn} or a new tensor")
    if isinstance(residual_weight, bool) or not isinstance(residual_weight, numbers.Real):
        raise TypeError(
            f"residual_weight must be a real number, got {type(residual_weight).__name__}"
        )
    if not math.isfinite(residual_weight):
        raise ValueError(f"residual_weight must be finite, got {residual_weight}")


def _rows(t: torch.Tensor, name: str, width: int, *, writable: bool) -> torch.Tensor:
    """[..., width] -> [M, width]. Inputs may be copied when not viewable; ``out`` must be a
    view (the kernel writes through it)."""
    try:
        return t.view(-1, width)
    except RuntimeError:
        if writable:
            raise ValueError(
                f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed "
                f"as [rows, {width}]: pass a tensor whose leading dims can be flattened"
            ) from None
        return t.reshape(-1, width)


@contextlib.contextmanager
def _float32_reductions():
    matmul = torch.backends.cuda.matmul
    saved = (
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
    )
    matmul.allow_fp16_reduced_precision_reduction = False
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (
            matmul.allow_fp16_reduced_precision_reduction,
            matmul.allow_bf16_reduced_precision_reduction,
        ) = saved


def linear_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    residual_weight: float = 1.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual_weight * residual + x @ weight.T`` in one launch.

    x [..., K], residual [..., N], weight [N, K] (nn.Linear layout); returns [..., N] in the
    inputs' dtype (bf16, fp16 or fp32), accumulated in float32 and rounded once. ``out`` may
    be ``residual`` (in place) or a new tensor viewable as [rows, N]; inputs may have any
    strides. An empty batch returns an empty result without a launch; NaN/inf propagate as in
    the formula. Out of place on the cuBLAS path (prefill) the residual is first copied into
    the new output, as ``torch.addmm`` does: as fast as the best out-of-place torch peer, but
    one kernel only with ``out=residual`` (docs/measured.md, "Out of place"). Every call
    checks its inputs (wrong shapes, dtypes, devices, strides and
    aliasing get an error naming the argument).

    On Hopper the GEMV path is launched with programmatic dependent launch: it may start while
    the kernel before it in the stream still runs, and it reads ``weight`` before waiting for
    that kernel (``x`` and ``residual`` only after). So the weight must not be written by the
    kernel launched just before this call, as inference weights are not.
    """
    return linear_residual_named(
        x, residual, weight, residual_weight, out, ("x", "residual", "weight")
    )


def linear_residual_named(x, residual, weight, residual_weight, out, names) -> torch.Tensor:
    """``linear_residual`` whose errors call x, residual and weight by ``names`` (the
    caller's argument names: kernels/fused_attn_output.py)."""
    _check_inputs(x, residual, weight, residual_weight, out, names)
    N, K = weight.shape
    if out is None:
        out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    if out.numel() == 0:
        return out
    x2 = _rows(x, names[0], K, writable=False)
    r2 = _rows(residual, names[1], N, writable=False)
    o2 = _rows(out, "out", N, writable=True)
    M = x2.shape[0]
    cfg = select_config(M, N, K, x.dtype)
    if cfg.path == "cublas":
        # beta * residual + x @ weight.T in cuBLAS's epilogue: one kernel, rounded once. By
        # default torch lets cuBLAS reduce split-K partials in fp16/bf16, which breaks
        # "accumulated in float32" (seen on the H100: up to 10 ulps at K=1537): not here.
        with _float32_reductions():
            torch.addmm(r2, x2, weight.T, beta=residual_weight, out=o2)
        return out
    check_32bit_indexing(**{names[0]: x2, names[1]: r2, names[2]: weight, "out": o2})
    plan = _plan(M, N, K, x.dtype, x.device, cfg)
    partials, arrivals = _split_k_buffers(x.device, *plan.partials_size)
    _gemv_residual_kernel[plan.grid](
        x2, weight, r2, o2, partials, arrivals, M, N, K, plan.k_per_split,
        *x2.stride(), *weight.stride(), *r2.stride(), *o2.stride(), float(residual_weight),
        **plan.constexprs, **plan.options,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------


def linear_residual_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, residual_weight: float = 1.0
) -> torch.Tensor:
    """The ops the fusion replaces: F.linear, then one add (two kernels), in the input dtype."""
    return torch.add(F.linear(x, weight), residual, alpha=residual_weight)


def linear_residual_float64(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, residual_weight: float = 1.0
) -> torch.Tensor:
    """The formula in float64 on upcast inputs (returned in float64)."""
    x, r, w = (t.double() for t in (x, residual, weight))
    return residual_weight * r + x @ w.T
