"""The whole MLP block of a decoder layer in one persistent launch, in two stages:

    stage 0, gate_up:  act = silu(RMSNorm(residual) @ Wg.T) * (RMSNorm(residual) @ Wu.T)
    stage 1, down:     residual += act @ Wd.T                                  (in place)

``gate_up_weight`` = [Wg | Wu] is the engine's merged [2I, K] layout, ``down_proj_weight`` Wd
is [K, I]. Each stage keeps the contract of the kernels it replaces (kernels/rms_norm_swiglu.py
and kernels/linear_residual.py): the norm rounded as transformers rounds it, every dot product
accumulated in float32, ``act`` rounded once to the dtype (it is the [M, I] intermediate
between the stages, as in the unfused model), the residual rounded once.

Why one launch: at decode the two kernels it replaces are latency-bound, and the gap between
them (the second kernel's launch, its wait for the first, the first loads of its weights) is a
large part of their time. Here a grid of one program per SM (all resident at once) runs stage
0 over tiles of the gate/up rows, loads its first tile of the down weight (weights never depend
on stage 0), meets every other program at a grid barrier, then runs stage 1. The down weight's
first bytes are in flight while the barrier waits.

The grid barrier is a sense-reversing counter in a small per-device buffer ``[arrivals,
generation, failed]`` (int32): each program reads the generation, counts its arrival, and the
last to arrive resets the count and advances the generation (release); the others spin until
they see it advance (acquire). The buffer resets itself, so calls need no zero-fill and CUDA
graph replays advance it as eager calls do. Every program of the grid must be resident at once
(a program waiting at the barrier holds its SM): the grid is at most one program per SM, and
the kernel lets the next kernel launch early (programmatic dependent launch) only after its
barrier, when all its programs are already resident. A spin bounded by ``SPIN_LIMIT`` polls
turns a barrier that never opens (a bug, or another launch on a second stream sharing the
buffer) into NaN outputs and a sticky ``failed`` flag that every later call honours (NaN
again) until ``reset_barrier``; ``barrier_failed(device)`` reads it. Calls on one device must
be stream-ordered, as the engine's are.

Two ways to run it, one kernel:

- whole (at most ``MAX_ROWS`` rows): one launch, both stages, the barrier between. Under
  Triton's interpreter, which runs programs one after another (a grid of several would wait
  forever at the barrier), the grid is one program, which meets itself there;
- one stage a launch (``FIRST_STAGE == LAST_STAGE``, no barrier): what ``mlp_block_gate_up``
  and ``mlp_block_down`` launch, for numerics and kernel time per stage.

Prefill (more rows) takes the two kernels the default path runs instead (``rms_norm_swiglu``
then ``linear_residual``).

With ``STAMPS`` each program writes four ``%globaltimer`` readings (ns) to a ``[programs, 4]``
buffer: at its start (before its first loads and its wait for the previous kernel, so that
the stages cover what a profiler counts as the kernel's time), at the end of its stage-0 work,
after the barrier, at the end of its stage-1 work. ``stage_times_us`` turns them into each
stage's time (the barrier's wait counted in stage 1), and ``recording_stage_times`` collects
them per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from kernels import gemv, tuning
from kernels.gemv import load_norm_weight, load_weight_tile, load_x, normalise, row_rstd
from kernels.launch_checks import (
    cdiv,
    check_32bit_indexing,
    check_same_dtype,
    check_tensor,
    next_pow2,
    overlaps,
    rows_view,
)
from kernels.linear_residual import linear_residual, linear_residual_float64
from kernels.rms_norm_swiglu import (
    rms_norm_swiglu,
    rms_norm_swiglu_float64,
    rms_norm_swiglu_reference,
)
from kernels.runtime import INTERPRETING, pdl_options, pdl_supported, sm_count

KERNEL = "mlp_block"
# The stages, in order: what each computes is in the module docstring.
STAGES = ("gate_up", "down")
# Decode sizes take the persistent kernel; more rows (prefill) the two kernels it replaces.
MAX_ROWS = 16
# Elements of a stage's [BLOCK_M, BLOCK_N, BLOCK_K] products a program holds at once (gate and
# up tiles together), so that registers do not spill (kernels/gemv.py's budget).
_GPU_TILE_BUDGET = 16384
# Barrier polls before a program gives up (~1 s at ~1 µs a poll): a hang becomes NaN.
SPIN_LIMIT = 1 << 20
# Stamps per program (see the module docstring).
STAMPS_PER_PROGRAM = 4
# Kernels that issue global loads (the weights) before their PDL wait, and that let the next
# kernel launch only at their end (after the barrier: see the module docstring).
READS_BEFORE_WAIT = ("_mlp_block_kernel",)
TRIGGER_AFTER_WAIT = ("_mlp_block_kernel",)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _now():
    """The GPU's global nanosecond timer (the same clock on every SM)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _grid_barrier(sync_ptr, num_programs, broken, SPIN_LIMIT: tl.constexpr):
    """Every program of the grid meets here; returns True where the barrier never opened (or
    ``broken``: an earlier one never did, so the count is wrong: no wait then).

    sync_ptr -> [arrivals, generation, failed]. The generation is read before arriving: it
    can only advance once every program, this one included, has arrived."""
    tl.debug_barrier()  # every thread's stores of the stage come before the arrival (release)
    generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    polls = tl.where(broken, SPIN_LIMIT, 0)
    while (seen == generation) & (polls < SPIN_LIMIT):
        seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
        polls += 1
    failed = (seen == generation) | broken
    if failed:
        tl.atomic_xchg(sync_ptr + 2, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()  # no thread reads stage 0's results before the acquire
    return failed


@triton.jit
def _gate_up_tile(
    x_ptr, nw_ptr, w_ptr, act_ptr, offs_m, offs_n, wg, wu, nw, rstd, M, I, K,
    stride_xm, stride_xk, stride_nw, stride_wn, stride_wk, stride_am,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """act[offs_m, offs_n] = silu(gate) * up, the first K chunk's weights already loaded."""
    up_ptr = w_ptr + I * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    a = normalise(load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk), rstd, nw)
    af = a.to(tl.float32)[:, None, :]
    gate = tl.sum(af * wg.to(tl.float32)[None, :, :], axis=2)
    up = tl.sum(af * wu.to(tl.float32)[None, :, :], axis=2)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # none when one chunk covers K
        offs_kk = k0 + offs_k
        wgk = load_weight_tile(w_ptr, offs_n, offs_kk, I, K, stride_wn, stride_wk, False)
        wuk = load_weight_tile(up_ptr, offs_n, offs_kk, I, K, stride_wn, stride_wk, False)
        nwk = load_norm_weight(nw_ptr, offs_kk, K, stride_nw)
        ak = normalise(load_x(x_ptr, offs_m, offs_kk, M, K, stride_xm, stride_xk), rstd, nwk)
        akf = ak.to(tl.float32)[:, None, :]
        gate += tl.sum(akf * wgk.to(tl.float32)[None, :, :], axis=2)
        up += tl.sum(akf * wuk.to(tl.float32)[None, :, :], axis=2)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(
        act_ptr + offs_m[:, None] * stride_am + offs_n[None, :],
        out.to(act_ptr.dtype.element_ty),
        mask=(offs_m < M)[:, None] & (offs_n < I)[None, :],
    )


@triton.jit
def _down_tile(
    act_ptr, w_ptr, x_ptr, offs_m, offs_n, w, poison, M, I, K,
    stride_am, stride_wn, stride_wk, stride_xm, stride_xk,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """residual[offs_m, offs_n] += act @ Wd[offs_n].T, the first I chunk's weight ``w``
    already loaded. act is read from L2 (.cg): other programs wrote it in this launch."""
    offs_k = tl.arange(0, BLOCK_K)
    a = tl.load(
        act_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
        mask=(offs_m < M)[:, None] & (offs_k < I)[None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    acc = tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    for k0 in range(BLOCK_K, I, BLOCK_K):  # none when one chunk covers I
        offs_kk = k0 + offs_k
        wk = load_weight_tile(w_ptr, offs_n, offs_kk, K, I, stride_wn, stride_wk, False)
        ak = tl.load(
            act_ptr + offs_m[:, None] * stride_am + offs_kk[None, :],
            mask=(offs_m < M)[:, None] & (offs_kk < I)[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        acc += tl.sum(ak.to(tl.float32)[:, None, :] * wk.to(tl.float32)[None, :, :], axis=2)
    mask = (offs_m < M)[:, None] & (offs_n < K)[None, :]
    r_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xk
    r = tl.load(r_ptrs, mask=mask).to(tl.float32)
    tl.store(r_ptrs, (acc + r + poison).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_block_kernel(
    x_ptr, nw_ptr, wgu_ptr, wd_ptr, act_ptr, sync_ptr, stamps_ptr, M, I, K,
    stride_xm, stride_xk, stride_nw, stride_gn, stride_gk, stride_dn, stride_dk, stride_am, eps,
    BLOCK_M: tl.constexpr, BLOCK_N0: tl.constexpr, BLOCK_K0: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_K1: tl.constexpr,
    FIRST_STAGE: tl.constexpr, LAST_STAGE: tl.constexpr,
    USE_PDL: tl.constexpr, STAMPS: tl.constexpr, SPIN_LIMIT: tl.constexpr,
):  # fmt: skip
    """Stages FIRST_STAGE..LAST_STAGE; program p takes tiles p, p + programs, ... of each
    stage (stage 0: BLOCK_N0 columns of act; stage 1: BLOCK_N1 columns of the residual).

    x_ptr is the residual [M, K]: read by stage 0's norm, updated in place by stage 1."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_m = tl.arange(0, BLOCK_M)
    if STAMPS:
        tl.store(stamps_ptr + pid * 4, _now())
    # A barrier that once failed leaves its count wrong: every later call gives NaN.
    broken = tl.load(sync_ptr + 2) != 0
    if FIRST_STAGE == 0:
        # The first tile's weights (never written by the previous kernel) before the wait;
        # in the loop, the next tile's are loaded before this one is reduced (one ahead).
        offs_k = tl.arange(0, BLOCK_K0)
        offs_n = pid * BLOCK_N0 + tl.arange(0, BLOCK_N0)
        wg = load_weight_tile(wgu_ptr, offs_n, offs_k, I, K, stride_gn, stride_gk, False)
        wu = load_weight_tile(
            wgu_ptr + I * stride_gn, offs_n, offs_k, I, K, stride_gn, stride_gk, False
        )
        nw = load_norm_weight(nw_ptr, offs_k, K, stride_nw)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        x0 = load_x(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        rstd = row_rstd(x0, x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_K0)
        for tile in range(pid, tl.cdiv(I, BLOCK_N0), num_programs):
            offs_n = tile * BLOCK_N0 + tl.arange(0, BLOCK_N0)
            ahead = offs_n + num_programs * BLOCK_N0  # masked beyond the last tile
            wg_ahead = load_weight_tile(wgu_ptr, ahead, offs_k, I, K, stride_gn, stride_gk, False)
            wu_ahead = load_weight_tile(
                wgu_ptr + I * stride_gn, ahead, offs_k, I, K, stride_gn, stride_gk, False
            )
            _gate_up_tile(
                x_ptr, nw_ptr, wgu_ptr, act_ptr, offs_m, offs_n, wg, wu, nw, rstd, M, I, K,
                stride_xm, stride_xk, stride_nw, stride_gn, stride_gk, stride_am, BLOCK_K0,
            )  # fmt: skip
            wg = wg_ahead
            wu = wu_ahead
        if STAMPS:
            tl.store(stamps_ptr + pid * 4 + 1, _now())
    if LAST_STAGE == 1:
        # The down weight's first tile is in flight while the barrier waits.
        offs_k = tl.arange(0, BLOCK_K1)
        offs_n = pid * BLOCK_N1 + tl.arange(0, BLOCK_N1)
        w = load_weight_tile(wd_ptr, offs_n, offs_k, K, I, stride_dn, stride_dk, False)
        if FIRST_STAGE == 0:
            broken = _grid_barrier(sync_ptr, num_programs, broken, SPIN_LIMIT)
        elif USE_PDL:
            tl.extra.cuda.gdc_wait()
        if STAMPS:
            tl.store(stamps_ptr + pid * 4 + 2, _now())
        poison = tl.where(broken, float("nan"), 0.0)
        for tile in range(pid, tl.cdiv(K, BLOCK_N1), num_programs):
            offs_n = tile * BLOCK_N1 + tl.arange(0, BLOCK_N1)
            ahead = offs_n + num_programs * BLOCK_N1
            w_ahead = load_weight_tile(wd_ptr, ahead, offs_k, K, I, stride_dn, stride_dk, False)
            _down_tile(
                act_ptr, wd_ptr, x_ptr, offs_m, offs_n, w, poison, M, I, K,
                stride_am, stride_dn, stride_dk, stride_xm, stride_xk, BLOCK_K1,
            )  # fmt: skip
            w = w_ahead
        if STAMPS:
            tl.store(stamps_ptr + pid * 4 + 3, _now())
    if USE_PDL:
        # After the barrier: every program of this grid is resident, so the next kernel's
        # programs cannot take an SM that one of ours still waits for.
        tl.extra.cuda.gdc_launch_dependents()


# --------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration: the grid (``programs``; whole runs need them all resident)
    and each stage's tile (BLOCK_N columns a tile, BLOCK_K of the reduction a chunk)."""

    programs: int
    BLOCK_M: int
    BLOCK_N0: int
    BLOCK_K0: int
    BLOCK_N1: int
    BLOCK_K1: int
    num_warps: int = 8

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N0", "BLOCK_K0", "BLOCK_N1", "BLOCK_K1", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"Config.{name} must be a power of two, got {value!r}")
        if not isinstance(self.programs, int) or self.programs < 1:
            raise ValueError(f"Config.programs must be >= 1, got {self.programs!r}")


def _tile(n: int, k: int, block_m: int, programs: int, budget: int, weights: int) -> tuple:
    """(BLOCK_N, BLOCK_K) for ``n`` output columns over ``k`` on ``programs`` programs. Each
    trip of a program's loops (a chunk of a tile) is a dependent round of loads: the fewest
    trips on the busiest program, then the fewest columns on it, then the wider tile. A chunk
    is as wide as ``budget`` product elements allow (``weights`` tiles a trip)."""

    def plan(bn):
        chunk = max(16, min(next_pow2(k), budget // (weights * block_m * bn)))
        busiest = cdiv(cdiv(n, bn), programs)
        return (busiest * cdiv(k, chunk), busiest * bn, -bn), chunk

    widths = [1 << i for i in range(next_pow2(n).bit_length())]
    widths = [bn for bn in widths if weights * block_m * bn * 16 <= budget] or [1]
    block_n = min(widths, key=lambda bn: plan(bn)[0])
    return block_n, plan(block_n)[1]


def heuristic_config(M: int, I: int, K: int, device: torch.device) -> Config:
    """Tiles for M rows, I intermediate columns, K hidden columns on ``device``."""
    block_m = next_pow2(M)
    if INTERPRETING:
        # The interpreter pays per program and per loop iteration, not per byte: a few fat
        # programs (a multiply-reduce product under its 2**20-element limit).
        budget = 1 << 20
        programs = 1  # one program meets itself at the barrier: the whole kernel, one launch
    else:
        budget = _GPU_TILE_BUDGET
        programs = sm_count(device)
    bn0, bk0 = _tile(I, K, block_m, programs, budget, weights=2)
    bn1, bk1 = _tile(K, I, block_m, programs, budget, weights=1)
    return Config(programs, block_m, bn0, bk0, bn1, bk1)


@functools.lru_cache(maxsize=256)
def _config(M: int, I: int, K: int, device: torch.device) -> Config:
    return heuristic_config(M, I, K, device)


# --------------------------------------------------------------------------------------------
# Per-device state: the barrier's buffer, the stamps
# --------------------------------------------------------------------------------------------


_sync: dict[torch.device, torch.Tensor] = {}


def _sync_buffer(device: torch.device | str) -> torch.Tensor:
    """[arrivals, generation, failed] (int32), zeroed once per device on first (eager) use,
    so that a CUDA graph captured later never allocates it. "cuda" is the current CUDA
    device, as for a tensor made there (one buffer per GPU, however it is named)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _sync.get(device)
    if buf is None:
        buf = _sync[device] = torch.zeros(4, dtype=torch.int32, device=device)
    return buf


def barrier_failed(device: torch.device | str) -> bool:
    """Whether a grid barrier on ``device`` ever timed out (its outputs were NaN since);
    reads the device (a sync)."""
    return int(_sync_buffer(device)[2].item()) != 0


def reset_barrier(device: torch.device | str) -> None:
    """Zero the barrier's buffer on ``device`` (after a failure; no call may be in flight)."""
    _sync_buffer(device).zero_()


_recording: list[list[torch.Tensor]] = []


@contextlib.contextmanager
def recording_stage_times() -> Iterator[list[torch.Tensor]]:
    """Within the block, every whole (compiled) call writes its stamps to a new
    ``[programs, 4]`` int64 buffer, appended to the yielded list in call order (eager calls
    only: a buffer allocated per call cannot be captured in a CUDA graph)."""
    calls: list[torch.Tensor] = []
    _recording.append(calls)
    try:
        yield calls
    finally:
        _recording.remove(calls)


def stage_times_us(stamps: torch.Tensor) -> dict[str, float]:
    """Each stage's time in one call, from its ``[programs, 4]`` stamps (ns): stage 0 from the
    first program's start to the last program's end of stage 0; stage 1 from there to the
    last program's end of stage 1 (the barrier's wait and the down weight's first load
    included). Their sum is the kernel's span from its first stamp to its last."""
    s = stamps.double().cpu()
    end0, end1 = s[:, 1].max(), s[:, 3].max()
    return {
        STAGES[0]: float(end0 - s[:, 0].min()) / 1e3,
        STAGES[1]: float(end1 - end0) / 1e3,
    }


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_gate_up(residual, norm_weight, gate_up_weight, eps) -> int:
    """Stage 0's inputs (errors name the argument); returns I, gate_up_weight's rows / 2."""
    return gemv.check_norm_gemv_inputs(
        residual,
        norm_weight,
        gate_up_weight,
        eps,
        None,
        weight_name="gate_up_weight",
        gated=True,
        x_name="residual",
    )


def _check(residual, norm_weight, gate_up_weight, down_proj_weight, eps) -> int:
    """Raise an error naming the argument unless the kernel can take these inputs; returns I."""
    I = _check_gate_up(residual, norm_weight, gate_up_weight, eps)
    K = gate_up_weight.shape[1]
    check_tensor(
        "down_proj_weight", down_proj_weight, device=residual.device, last_dim_contiguous=False
    )
    check_same_dtype("residual", residual, down_proj_weight=down_proj_weight)
    if tuple(down_proj_weight.shape) != (K, I):
        raise ValueError(
            f"down_proj_weight has shape {tuple(down_proj_weight.shape)}; expected [{K}, {I}] "
            "(hidden x intermediate, nn.Linear layout)"
        )
    for name, t in (
        ("norm_weight", norm_weight),
        ("gate_up_weight", gate_up_weight),
        ("down_proj_weight", down_proj_weight),
    ):
        if overlaps(residual, t):
            raise ValueError(f"residual overlaps {name}: it is updated in place")
    return I


def _launch(x2, norm_weight, gate_up_weight, down_proj_weight, act, eps, first, last) -> None:
    M, K = x2.shape
    I = act.shape[1]
    # A forced configuration (kernels.tuning.use_config: trying tiles or grids by hand).
    cfg = tuning.override(KERNEL) or _config(M, I, K, x2.device)
    use_pdl = pdl_supported(x2.device)
    whole = first == 0 and last == 1
    stamps = None
    if whole and _recording and not INTERPRETING:  # %globaltimer needs the GPU
        # Every program writes all four: no fill launched before the kernel.
        stamps = torch.empty(cfg.programs, STAMPS_PER_PROGRAM, dtype=torch.int64, device=x2.device)
        _recording[-1].append(stamps)
    sync = _sync_buffer(x2.device)
    check_32bit_indexing(
        residual=x2, gate_up_weight=gate_up_weight, down_proj_weight=down_proj_weight, act=act
    )
    _mlp_block_kernel[(cfg.programs,)](
        x2, norm_weight, gate_up_weight, down_proj_weight, act, sync,
        stamps if stamps is not None else sync, M, I, K,
        *x2.stride(), norm_weight.stride(0), *gate_up_weight.stride(), *down_proj_weight.stride(),
        act.stride(0), eps,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N0=cfg.BLOCK_N0, BLOCK_K0=cfg.BLOCK_K0,
        BLOCK_N1=cfg.BLOCK_N1, BLOCK_K1=cfg.BLOCK_K1, FIRST_STAGE=first, LAST_STAGE=last,
        USE_PDL=use_pdl, STAMPS=stamps is not None, SPIN_LIMIT=SPIN_LIMIT,
        num_warps=cfg.num_warps, num_stages=1, **pdl_options(use_pdl),
    )  # fmt: skip


def mlp_block(
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_proj_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``residual += swiglu(RMSNorm(residual)) @ down_proj_weight.T`` in place; returns
    ``residual``.

    residual [..., K] (viewable as [rows, K]), norm_weight [K], gate_up_weight [2I, K] (gate
    rows, then up rows), down_proj_weight [K, I], one dtype (bf16, fp16 or fp32). Up to
    ``MAX_ROWS`` rows on a GPU: one launch (both stages, a grid barrier between); under the
    interpreter: one launch a stage; more rows: ``rms_norm_swiglu`` then ``linear_residual``.
    An empty batch returns at once. Every call checks its inputs (errors name the argument).
    The weights are read before the wait for the previous kernel (Hopper PDL): they must not be
    written by it, as inference weights are not.
    """
    I = _check(residual, norm_weight, gate_up_weight, down_proj_weight, eps)
    K = gate_up_weight.shape[1]
    if residual.numel() == 0:
        return residual
    x2 = rows_view("residual", residual, K)
    M = x2.shape[0]
    if M > MAX_ROWS:
        act = rms_norm_swiglu(x2, norm_weight, gate_up_weight, eps)
        linear_residual(act, x2, down_proj_weight, out=x2)
        return residual
    act = torch.empty((M, I), dtype=residual.dtype, device=residual.device)
    _launch(x2, norm_weight, gate_up_weight, down_proj_weight, act, eps, 0, 1)
    return residual


def mlp_block_gate_up(
    residual: torch.Tensor, norm_weight: torch.Tensor, gate_up_weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Stage 0 alone (one launch of the same kernel): returns act [..., I]."""
    I = _check_gate_up(residual, norm_weight, gate_up_weight, eps)
    K = gate_up_weight.shape[1]
    act = torch.empty((*residual.shape[:-1], I), dtype=residual.dtype, device=residual.device)
    if act.numel() == 0:
        return act
    x2 = residual.reshape(-1, K)
    if x2.shape[0] > MAX_ROWS:
        return rms_norm_swiglu(residual, norm_weight, gate_up_weight, eps)
    # Stage 1's pointers are unread here: any tensor of the dtype stands in (no allocation
    # and no fill launched in a timed graph).
    _launch(x2, norm_weight, gate_up_weight, gate_up_weight, act.view(-1, I), eps, 0, 0)
    return act


def mlp_block_down(
    act: torch.Tensor, residual: torch.Tensor, down_proj_weight: torch.Tensor
) -> torch.Tensor:
    """Stage 1 alone (one launch of the same kernel): ``residual += act @ down_proj_weight.T``
    in place; returns residual."""
    check_tensor("act", act)
    check_tensor("residual", residual, device=act.device, last_dim_contiguous=False)
    check_tensor(
        "down_proj_weight", down_proj_weight, dim=2, device=act.device, last_dim_contiguous=False
    )
    check_same_dtype("act", act, residual=residual, down_proj_weight=down_proj_weight)
    K, I = down_proj_weight.shape
    if act.shape[-1] != I or tuple(residual.shape) != (*act.shape[:-1], K):
        raise ValueError(
            f"act {tuple(act.shape)}, residual {tuple(residual.shape)} and down_proj_weight "
            f"[{K}, {I}]: expected act[..., {I}] and residual[..., {K}] with the same rows"
        )
    if residual.numel() == 0:
        return residual
    x2 = rows_view("residual", residual, K)
    a2 = act.reshape(-1, I).contiguous()
    if x2.shape[0] > MAX_ROWS:
        linear_residual(a2, x2, down_proj_weight, out=x2)
        return residual
    # Stage 0's pointers are unread here: the down weight stands in for them.
    _launch(x2, down_proj_weight, down_proj_weight, down_proj_weight, a2, 1e-6, 1, 1)
    return residual


# --------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------


def mlp_block_reference(residual, norm_weight, gate_up_weight, down_proj_weight, eps):
    """The unfused ops in the inputs' dtype (a new tensor): RMSNorm, gate/up GEMM, SiLU * up,
    down GEMM, the residual add."""
    act = rms_norm_swiglu_reference(residual, norm_weight, gate_up_weight, eps)
    return residual + torch.nn.functional.linear(act, down_proj_weight)


def mlp_block_float64(residual, norm_weight, gate_up_weight, down_proj_weight, eps):
    """The formula in float64 on upcast inputs, no intermediate rounding."""
    act = rms_norm_swiglu_float64(residual, norm_weight, gate_up_weight, eps)
    return linear_residual_float64(act, residual, down_proj_weight)
