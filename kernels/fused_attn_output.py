"""Fused attention output projection + residual add (DESIGN.md D1).

    out = residual_weight * residual + attn_output @ o_proj_weight.T

in ONE launch, accumulated in float32 and rounded once to the output dtype. It replaces the
two kernels at the end of a Qwen3 attention block (o_proj GEMM, then the residual add). The
saving is a launch and the ~2 KB intermediate per layer at decode, not bandwidth: both paths
read the same 4.2 MB of weights per layer (N=1024, K=2048, bf16).

Two code paths, chosen per call by M (token rows):
- ``gemv``: small M (decode). Programs tile N finely (and split K where that fills the SMs
  better; the last program to finish a tile reduces it, still one launch) so that every SM
  streams a slice of the weight; the dot is a float32 multiply-reduce, or ``tl.dot`` on
  16-row tiles. On Hopper it uses programmatic dependent launch (PDL): the kernel lets the
  next one launch at once, and loads its weight slice before waiting for the previous one,
  so one kernel's weight stream overlaps the tail of the kernel before it.
- ``gemm``: larger M (prefill). A tiled ``tl.dot`` GEMM with the residual in the epilogue,
  its tiles loaded through TMA descriptors where the tensors allow (16-byte aligned rows),
  else through pointers.

The launch configuration comes from the tuned table for this GPU (kernels/configs/<gpu>.json,
written by kernels/tune.py from real runs) or from a shape heuristic. Under the Triton
interpreter (CPU) blocks are large because the interpreter pays per program and per loop
iteration, and bf16 operands are upcast before ``tl.dot`` (triton issue 11584).

File layout (Triton-tutorial style): kernels, launcher with input checks, torch references.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import numbers
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.runtime import INTERPRETING, gpu_slug, launch, pdl_supported

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CONFIG_DIR = Path(__file__).with_name("configs")
# Untuned shapes take the small-M (GEMV) path up to this many rows, the tiled GEMM above.
GEMV_MAX_M = 64


# --------------------------------------------------------------------------------------------
# Triton kernels
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
def _mma(acc, a, b, UPCAST_DOT: tl.constexpr, IEEE_FP32: tl.constexpr):
    """acc + a @ b on the tensor cores; fp32 exact (ieee), bf16 upcast under the interpreter."""
    # One return at the end: Triton 3.6 does not end a function at a return inside a
    # constexpr branch.
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_FP32:  # noqa: SIM108  (constexpr branch: only one dot is compiled)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles: consecutive programs share weight tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _load_weight_tile(w_ptr, offs_n, offs_k, N, k_end, stride_wn, stride_wk, USE_DOT: tl.constexpr):
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
        acc = _mma(acc, x, w, UPCAST_DOT, IEEE_FP32)
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
    w = _load_weight_tile(w_ptr, offs_n, offs_k, N, k_end, stride_wn, stride_wk, USE_DOT)
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
        w = _load_weight_tile(w_ptr, offs_n, offs_k, N, k_end, stride_wn, stride_wk, USE_DOT)
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


@triton.jit
def _gemm_residual_kernel(
    x_ptr,
    w_ptr,
    r_ptr,
    out_ptr,
    M,
    N,
    K,
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
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Large-M path (any strides): tiled tl.dot GEMM, residual added in the epilogue."""
    if USE_PDL:  # the next kernel may launch now; it waits for this one before its reads
        tl.extra.cuda.gdc_launch_dependents()
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # W is [N, K]; the tile is read transposed as [BLOCK_K, BLOCK_N].
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST_DOT, IEEE_FP32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    r = _load_residual(r_ptr, offs_m, offs_n, M, N, stride_rm, stride_rn)
    _store_out(acc, r, residual_weight, out_ptr, offs_m, offs_n, M, N, stride_om, stride_on)


@triton.jit
def _gemm_residual_tma_kernel(
    x_desc,
    w_desc,
    r_desc,
    out_desc,
    M,
    N,
    K,
    residual_weight,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Large-M path through the tensor memory accelerator (Hopper TMA descriptors): tiles are
    copied global -> shared by the copy engine; out-of-range rows and columns are zero-filled
    on load and clipped on store. Needs contiguous rows with 16-byte aligned strides."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = x_desc.load([off_m, k])
        b = w_desc.load([off_n, k])
        acc = _mma(acc, a, b.T, UPCAST_DOT, IEEE_FP32)
    r = r_desc.load([off_m, off_n])
    out = acc + residual_weight * r.to(tl.float32)
    out_desc.store([off_m, off_n], out.to(out_desc.dtype))


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration.

    ``path`` "gemv": small M; ``split_k`` K slices reduced by the last-arriving program,
    ``dot`` picks tl.dot (tiles >= 16) over a float32 multiply-reduce. ``path`` "gemm":
    tiled tl.dot with grouped ordering; ``tma`` loads its tiles through TMA descriptors
    (calls whose tensors a descriptor cannot take use the pointer GEMM with the same tiles).
    ``pdl``: programmatic dependent launch (Hopper).
    """

    path: str
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 1
    GROUP_M: int = 8
    pdl: bool = False
    split_k: int = 1
    dot: bool = False
    tma: bool = False

    def __post_init__(self):
        if self.path not in ("gemv", "gemm"):
            raise ValueError(f"KernelConfig.path must be 'gemv' or 'gemm', got {self.path!r}")
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")
        if self.split_k < 1 or (self.split_k > 1 and self.path != "gemv"):
            raise ValueError(
                f"KernelConfig.split_k must be >= 1 (gemv path only), got {self.split_k}"
            )
        if self.tma and self.path != "gemm":
            raise ValueError("KernelConfig.tma applies to the gemm path only")
        if (self.dot or self.path == "gemm") and min(self.BLOCK_M, self.BLOCK_N, self.BLOCK_K) < 16:
            raise ValueError("KernelConfig: tl.dot needs BLOCK_M, BLOCK_N and BLOCK_K >= 16")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> KernelConfig:
        return cls(**data)


_config_override: KernelConfig | None = None
_tuned_tables: dict[str, dict] = {}


@contextlib.contextmanager
def use_config(config: KernelConfig | None) -> Iterator[None]:
    """Force every call inside the block to use ``config`` (tuning, planted regressions)."""
    global _config_override
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    previous, _config_override = _config_override, config
    try:
        yield
    finally:
        _config_override = previous


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def m_bucket(M: int) -> int:
    """Rows are bucketed by the next power of two; tuned tables are keyed by bucket."""
    return 1 << max(0, (M - 1).bit_length())


def _dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tuned_table(slug: str | None = None) -> dict:
    """This GPU's tuned table ({} when none is committed)."""
    slug = gpu_slug() if slug is None else slug
    if slug not in _tuned_tables:
        path = CONFIG_DIR / f"{slug}.json"
        _tuned_tables[slug] = json.loads(path.read_text()) if path.exists() else {}
    return _tuned_tables[slug]


def _tuned_config(M: int, N: int, K: int, dtype: torch.dtype) -> KernelConfig | None:
    if INTERPRETING:
        return None
    by_m = tuned_table().get("configs", {}).get(f"{N}x{K}", {}).get(_dtype_key(dtype))
    if not by_m:
        return None
    buckets = sorted(int(b) for b in by_m)
    bucket = m_bucket(M)
    # Beyond the largest tuned bucket, the largest one's tiling is the closest guess.
    chosen = next((b for b in buckets if b >= bucket), buckets[-1])
    return KernelConfig.from_json(by_m[str(chosen)])


def heuristic_config(M: int, N: int, K: int, dtype: torch.dtype) -> KernelConfig:
    """A sound configuration for any shape when no tuned one applies."""
    k_pow2 = _next_pow2(K)
    if INTERPRETING:
        # The interpreter pays per program and per loop iteration: few, fat programs
        # (tiles stay under the 2**20-element limit).
        if M <= 16:
            block_m = m_bucket(M)
            block_n = min(256, _next_pow2(N))
            block_k = min(k_pow2, max(16, (1 << 20) // (block_m * block_n)))
            return KernelConfig("gemv", block_m, block_n, block_k)
        return KernelConfig(
            "gemm",
            min(128, _next_pow2(M)),
            min(128, max(16, _next_pow2(N))),
            min(512, max(16, k_pow2)),
        )
    # Shapes of the H100 tuning (kernels/configs) generalised. Small M: each program's K
    # slice is one tile, so its whole weight slice is in flight before the PDL wait;
    # multiply-reduce up to M=4, tl.dot on [16+, 32] tiles above, ~128+ programs.
    if M <= 4:
        block_k = min(k_pow2, 2048)
        return KernelConfig(
            "gemv", m_bucket(M), max(1, 8 // m_bucket(M)), block_k, num_warps=4, pdl=True,
            split_k=_cdiv(k_pow2, block_k),
        )  # fmt: skip
    if M <= GEMV_MAX_M:
        split_k = min(16, max(1, k_pow2 // 512))
        block_k = max(16, _cdiv(k_pow2, split_k))
        return KernelConfig(
            "gemv", max(16, m_bucket(M)), 32, block_k, 4, 1, pdl=True, split_k=split_k, dot=True
        )
    # float32 tiles take twice the shared memory per stage: halve BLOCK_K (228 KB per SM).
    block_k = 128 if dtype != torch.float32 else 32
    if M <= 512:
        return KernelConfig("gemm", 64, 64, block_k, num_warps=4, num_stages=4, pdl=True)
    return KernelConfig("gemm", 128, 128, block_k, num_warps=8, num_stages=3, pdl=True)


def _choose_config(M, N, K, dtype, override: KernelConfig | None) -> KernelConfig:
    return override or _tuned_config(M, N, K, dtype) or heuristic_config(M, N, K, dtype)


def select_config(M: int, N: int, K: int, dtype: torch.dtype) -> KernelConfig:
    """The configuration a call will use: override, else tuned table, else heuristic."""
    return _choose_config(M, N, K, dtype, _config_override)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LaunchPlan:
    """Everything about a launch that depends only on (M, N, K, dtype, device, config)."""

    config: KernelConfig
    M: int
    grid: tuple[int, ...]
    k_per_split: int
    constexprs: dict
    launch_options: dict
    partials_size: tuple[int, int]  # (tiles, floats per tile) for split-K buffers


@functools.lru_cache(maxsize=4096)
def _launch_plan(
    M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, override: KernelConfig | None
) -> _LaunchPlan:
    # Cached: the eager decode path calls the kernel once per layer per token, and the
    # per-call Python cost (config lookup, grid arithmetic) is what eager tok/s pays for.
    cfg = _choose_config(M, N, K, dtype, override)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    use_pdl = cfg.pdl and pdl_supported(device)
    if use_pdl:
        options["launch_pdl"] = True
    constexprs = {
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_N": cfg.BLOCK_N,
        "BLOCK_K": cfg.BLOCK_K,
        "UPCAST_DOT": INTERPRETING and dtype != torch.float32,
        "IEEE_FP32": dtype == torch.float32,
        "USE_PDL": use_pdl,
    }
    if cfg.path == "gemm":
        grid = (_cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N),)
        constexprs["GROUP_M"] = cfg.GROUP_M
        return _LaunchPlan(cfg, M, grid, K, constexprs, options, (0, 0))
    n_tiles, m_tiles = _cdiv(N, cfg.BLOCK_N), _cdiv(M, cfg.BLOCK_M)
    k_per_split = _cdiv(_cdiv(K, cfg.split_k), cfg.BLOCK_K) * cfg.BLOCK_K
    split_k = _cdiv(K, k_per_split)  # no empty slices
    constexprs.update(SPLIT_K=split_k, USE_DOT=cfg.dot)
    partials = (n_tiles * m_tiles, split_k * cfg.BLOCK_M * cfg.BLOCK_N)
    grid = (n_tiles, split_k, m_tiles)
    return _LaunchPlan(cfg, M, grid, k_per_split, constexprs, options, partials)


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


def _memory_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) that ``t`` may touch."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return (t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size())


def _spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _spans_overlap(_memory_span(a), _memory_span(b))


def _check_inputs(attn_output, residual, o_proj_weight, residual_weight, out) -> None:
    named = {"attn_output": attn_output, "residual": residual, "o_proj_weight": o_proj_weight}
    if out is not None:
        named["out"] = out
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if attn_output.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"attn_output has dtype {attn_output.dtype}; supported: bfloat16, float16, float32"
        )
    for name, t in named.items():
        if t.dtype != attn_output.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but attn_output has {attn_output.dtype}: "
                "attn_output, residual, o_proj_weight and out must share one dtype"
            )
    for name, t in named.items():
        if t.device != attn_output.device:
            raise ValueError(
                f"{name} is on {t.device} but attn_output is on {attn_output.device}: "
                "all tensors must be on one device"
            )
    if attn_output.device.type == "cuda" and INTERPRETING:
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set but the tensors are on CUDA: unset it to run compiled"
        )
    if attn_output.device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"attn_output is on {attn_output.device}: the kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before importing kernels, to interpret on CPU)"
        )
    if o_proj_weight.dim() != 2:
        raise ValueError(
            f"o_proj_weight must be 2-D [N, K] (nn.Linear layout), got shape "
            f"{tuple(o_proj_weight.shape)}"
        )
    N, K = o_proj_weight.shape
    if K == 0:
        raise ValueError("o_proj_weight has K=0 input features; expected K >= 1")
    if attn_output.dim() < 1 or attn_output.shape[-1] != K:
        raise ValueError(
            f"attn_output has shape {tuple(attn_output.shape)} but o_proj_weight is [N={N}, "
            f"K={K}]: expected attn_output[..., {K}]"
        )
    expected = (*attn_output.shape[:-1], N)
    if tuple(residual.shape) != expected:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)}; expected {expected} "
            "(attn_output's leading dims, then o_proj_weight's N)"
        )
    if out is not None:
        if tuple(out.shape) != expected:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected {expected}")
        if 0 in out.stride() and out.numel() > 1:
            raise ValueError("out has a zero stride (an expanded tensor): rows would overlap")
        for name in ("attn_output", "o_proj_weight"):
            if _overlaps(out, named[name]):
                raise ValueError(f"out overlaps {name}: only out=residual may alias an input")
        same_view = out.data_ptr() == residual.data_ptr() and out.stride() == residual.stride()
        if _overlaps(out, residual) and not same_view:
            raise ValueError("out partially overlaps residual: pass out=residual or a new tensor")
    if isinstance(residual_weight, bool) or not isinstance(residual_weight, numbers.Real):
        raise TypeError(
            f"residual_weight must be a real number, got {type(residual_weight).__name__}"
        )
    if not math.isfinite(residual_weight):
        raise ValueError(f"residual_weight must be finite, got {residual_weight}")


def _rows(t: torch.Tensor, name: str, K: int, *, writable: bool) -> torch.Tensor:
    """[..., K] -> [M, K]. Inputs may be copied when not viewable; ``out`` must be a view."""
    try:
        return t.view(-1, K)
    except RuntimeError:
        if writable:
            raise ValueError(
                f"{name} with shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed "
                f"as [rows, {K}]: pass a tensor whose leading dims can be flattened"
            ) from None
        return t.reshape(-1, K)


def _check_32bit_indexing(**matrices: torch.Tensor) -> None:
    """Offsets are int32 in the kernels: every 2-D operand must span < 2**31 elements."""
    for name, t in matrices.items():
        (rows, cols), (row_stride, col_stride) = t.shape, t.stride()
        if (rows - 1) * abs(row_stride) + (cols - 1) * abs(col_stride) >= 2**31:
            raise ValueError(f"{name} spans more than 2**31 elements: 32-bit indexing overflows")


# Inputs already checked once, keyed by everything the checks read (shapes, strides, dtypes,
# devices, the residual_weight type, the config override, in place or not): the launch plan,
# the strides of the [rows, K] / [rows, N] views and the byte extents of attn_output and
# residual (in place, the one check that depends on the pointers: they must not overlap).
# Eager decode calls the kernel once per layer per token with the same signature, and
# re-checking costs more host time than the launch itself.
_checked_calls: dict[tuple, tuple[_LaunchPlan, tuple[int, ...], int, int]] = {}


def _call_key(attn_output, residual, o_proj_weight, residual_weight, in_place) -> tuple | None:
    try:
        return (
            attn_output.shape, attn_output.stride(), attn_output.dtype, attn_output.device,
            residual.shape, residual.stride(), residual.dtype, residual.device,
            o_proj_weight.shape, o_proj_weight.stride(), o_proj_weight.dtype,
            o_proj_weight.device, type(residual_weight), _config_override, in_place,
        )  # fmt: skip
    except (AttributeError, TypeError):  # not tensors: the full checks name the argument
        return None


def _tma_ready(*matrices: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides, and contiguous rows."""
    return all(
        t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in matrices
    )


def _launch(
    plan: _LaunchPlan, x, w, r, out, strides: tuple[int, ...], residual_weight, call_key=None
) -> None:
    """One launch; x, r, out may be [..., K] / [..., N] tensors: ``strides`` are their rows'.

    ``call_key``: the checked-call key of these inputs (it fixes every shape, stride and
    dtype); with the alignment of the pointers it keys the launch fast path directly.
    """
    M, (N, K) = plan.M, w.shape
    cfg = plan.config
    if cfg.path == "gemv":
        partials, arrivals = _split_k_buffers(x.device, *plan.partials_size)
        if call_key is not None:  # the split-K buffers are always 16-byte aligned
            aligned = tuple(t.data_ptr() % 16 == 0 for t in (x, w, r, out))
            call_key = (call_key, aligned)
        launch(
            _gemv_residual_kernel, plan.grid,
            x, w, r, out, partials, arrivals, M, N, K, plan.k_per_split,
            *strides, float(residual_weight), key=call_key, **plan.constexprs,
            **plan.launch_options,
        )  # fmt: skip
        return
    if cfg.tma:
        x2, r2, o2 = x.view(M, K), r.view(M, N), out.view(M, N)
        if _tma_ready(x2, w, r2, o2):
            bm, bn, bk = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
            launch(
                _gemm_residual_tma_kernel, plan.grid,
                TensorDescriptor.from_tensor(x2, [bm, bk]),
                TensorDescriptor.from_tensor(w, [bn, bk]),
                TensorDescriptor.from_tensor(r2, [bm, bn]),
                TensorDescriptor.from_tensor(o2, [bm, bn]),
                M, N, K, float(residual_weight), **plan.constexprs, **plan.launch_options,
            )  # fmt: skip
            return
    launch(
        _gemm_residual_kernel, plan.grid,
        x, w, r, out, M, N, K,
        *strides, float(residual_weight), **plan.constexprs, **plan.launch_options,
    )  # fmt: skip


def fused_attn_output_residual(
    attn_output: torch.Tensor,
    residual: torch.Tensor,
    o_proj_weight: torch.Tensor,
    residual_weight: float = 1.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual_weight * residual + attn_output @ o_proj_weight.T`` in one launch (D1).

    attn_output [..., K], residual [..., N], o_proj_weight [N, K]; returns [..., N] in the
    inputs' dtype (bf16, fp16 or fp32). ``out`` may be ``residual`` (in place). Any strides
    are taken for inputs; ``out`` must be viewable as [rows, N]. An empty batch returns an
    empty result without a launch. NaN/inf propagate as in the formula.

    On Hopper the kernel is launched with programmatic dependent launch: it may start while
    the kernel before it in the stream still runs, and it reads ``o_proj_weight`` before
    waiting for that kernel (``attn_output`` and ``residual`` only after). So the weight must
    not be written by the kernel launched just before this call, as inference weights are not.
    """
    in_place = out is residual
    key = None
    if out is None or in_place:
        key = _call_key(attn_output, residual, o_proj_weight, residual_weight, in_place)
    checked = _checked_calls.get(key)
    if checked is not None and math.isfinite(residual_weight):
        plan, strides, x_bytes, r_bytes = checked
        if not in_place:
            out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
        else:
            x0, r0 = attn_output.data_ptr(), residual.data_ptr()
            if _spans_overlap((x0, x0 + x_bytes), (r0, r0 + r_bytes)):  # the checks name it
                _check_inputs(attn_output, residual, o_proj_weight, residual_weight, out)
        _launch(plan, attn_output, o_proj_weight, residual, out, strides, residual_weight, key)
        return out

    _check_inputs(attn_output, residual, o_proj_weight, residual_weight, out)
    N, K = o_proj_weight.shape
    if out is None:
        out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    if out.numel() == 0:
        return out
    x2 = _rows(attn_output, "attn_output", K, writable=False)
    r2 = _rows(residual, "residual", N, writable=False)
    o2 = _rows(out, "out", N, writable=True)
    _check_32bit_indexing(attn_output=x2, residual=r2, o_proj_weight=o_proj_weight, out=o2)
    M = x2.shape[0]
    plan = _launch_plan(M, N, K, attn_output.dtype, attn_output.device, _config_override)
    strides = (*x2.stride(), *o_proj_weight.stride(), *r2.stride(), *o2.stride())
    views_only = x2.data_ptr() == attn_output.data_ptr() and r2.data_ptr() == residual.data_ptr()
    if not views_only:  # a copied input must be copied again next time: no fast path
        key = None
    _launch(plan, x2, o_proj_weight, r2, o2, strides, residual_weight, key)
    if key is not None:
        if len(_checked_calls) > 4096:
            _checked_calls.clear()
        x_span, r_span = _memory_span(attn_output), _memory_span(residual)
        _checked_calls[key] = (plan, strides, x_span[1] - x_span[0], r_span[1] - r_span[0])
    return out


# --------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------


def unfused_attn_output_residual(
    attn_output: torch.Tensor,
    residual: torch.Tensor,
    o_proj_weight: torch.Tensor,
    residual_weight: float = 1.0,
) -> torch.Tensor:
    """The path the fusion replaces: F.linear, then one add (two kernels), in the input dtype."""
    return torch.add(F.linear(attn_output, o_proj_weight), residual, alpha=residual_weight)


def attn_output_residual_float64(
    attn_output: torch.Tensor,
    residual: torch.Tensor,
    o_proj_weight: torch.Tensor,
    residual_weight: float = 1.0,
) -> torch.Tensor:
    """D2's reference: the same formula in float64 on upcast inputs (returned in float64)."""
    x, r, w = (t.double() for t in (attn_output, residual, o_proj_weight))
    return residual_weight * r + x @ w.T
