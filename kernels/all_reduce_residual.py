"""All-reduce + residual add in one launch: ``out = residual + sum over ranks r of x_r``.

Under tensor parallelism (engine/parallel.py) each rank's row-parallel projection (o_proj,
down_proj) yields a partial sum ``x_r`` of the full projection; the unfused engine all-reduces
it (one NCCL kernel) and then adds it to the residual stream (one more kernel). This file holds
the three forms of that step:

- ``reference``: the torch path the engine runs unfused, ``torch.distributed.all_reduce`` (SUM,
  in place) and then ``residual + x``: two launches, two roundings.
- ``float64_reference`` / ``gathered_float64_reference``: the exact formula. One rank holds only
  its own partial, so per rank the exact result needs every rank's partial:
  ``gathered_float64_reference`` all-gathers them (a collective: every rank calls it) and sums
  them in float64 in rank order, then adds the residual. The partials are taken as they are
  (already rounded to the model's dtype by each rank's projection): this is the reference of
  the all-reduce and the add, not of the projection before it, whose own error the projection's
  op accounts for.
- ``all_reduce_residual``: the fused launcher. On CUDA with ``torch.distributed``'s symmetric
  memory (peer-to-peer access between the ranks' GPUs, NCCL process group) one Triton kernel
  does the one-shot all-reduce: each rank stores its partial in its symmetric buffer, meets the
  same block of every peer at a barrier on the signal pads, reads every peer's partial over
  NVLink, sums them in float32 in rank order (the same order on every rank: every rank gets the
  same bits), adds the residual and rounds once. Everywhere else (CPU tensors, gloo, Triton's
  interpreter, no symmetric memory, no P2P) the launcher raises an error saying why, and the
  engine runs the unfused path instead (with a warning). ``unavailable_reason`` says which.

On two H100s (NVLink) the CUDA path matches the float64 reference and replays under CUDA
graphs (tests/test_tensor_parallel.py, marked gpu), but costs more than NCCL's all-reduce plus
the add (8.5 vs 8.0 µs at [1, 4096]; the two system-scope barriers per call are the likely
cost, not yet profiled), so the TP default leaves it off. NVLink multicast (NVLS, ``multimem``
instructions) is never used: peers are read with ordinary loads through their P2P mappings,
and engine/parallel.py switches multicast off in the environment before any process group
exists.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.launch_checks import cdiv, check_same_dtype, check_tensor, next_pow2
from kernels.runtime import INTERPRETING

KERNEL = "all_reduce_residual"
# Inputs up to this size take the one-shot kernel (decode: rows x hidden, ~2-64 KB); larger
# ones (prefill) all-reduce with NCCL and then add, since reading every peer's whole partial
# (world_size x the data per rank) stops paying once the copy is bandwidth-bound. It is also
# the size of each rank's symmetric buffer, allocated once: a CUDA graph captured later never
# allocates or meets its peers again.
ONE_SHOT_MAX_BYTES = 1 << 20
# One-shot all-reduce reads every peer: beyond one NVLink domain of 8 GPUs it stops paying.
MAX_WORLD_SIZE = 8


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def reference(x: torch.Tensor, residual: torch.Tensor, group=None) -> torch.Tensor:
    """The unfused path: all-reduce ``x`` in place (SUM over ``group``), then ``residual + x``."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return residual + x


def float64_reference(partials, residual: torch.Tensor) -> torch.Tensor:
    """``residual + sum(partials)`` in float64, the partials summed in rank order."""
    total = torch.zeros_like(residual, dtype=torch.float64)
    for p in partials:
        total += p.double()
    return residual.double() + total


def gathered_float64_reference(x: torch.Tensor, residual: torch.Tensor, group=None):
    """The exact result on this rank: every rank's partial all-gathered (a collective: every
    rank of ``group`` calls it), then ``float64_reference``."""
    partials = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(partials, x.contiguous(), group=group)
    return float64_reference(partials, residual)


# --------------------------------------------------------------------------------------------
# Triton kernel (CUDA only)
# --------------------------------------------------------------------------------------------


@triton.jit
def _thread_id():
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _send_signal(addrs):
    """Set each slot from 0 to 1 (release at system scope: this block's stores before it),
    spinning while the peer has not yet consumed the previous signal."""
    tl.inline_asm_elementwise(
        """
        {
            .reg .u32 %tmp32_<1>;
            .reg .pred %p<1>;
            send_signal:
                atom.release.sys.global.cas.b32 %tmp32_0, [$1], 0, 1;
                setp.eq.u32 %p0, %tmp32_0, 0;
                @!%p0 bra send_signal;
        }
        """,
        "=r, l",
        [addrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _wait_signal(addrs):
    """Wait until each slot is 1 and reset it to 0 (acquire at system scope: the peer's stores
    before its signal are visible after)."""
    tl.inline_asm_elementwise(
        """
        {
            .reg .u32 %tmp32_<1>;
            .reg .pred %p<1>;
            wait_signal:
                atom.acquire.sys.global.cas.b32 %tmp32_0, [$1], 1, 0;
                setp.eq.u32 %p0, %tmp32_0, 1;
                @!%p0 bra wait_signal;
        }
        """,
        "=r, l",
        [addrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _block_barrier(signal_pad_ptrs, block, rank, WORLD_SIZE: tl.constexpr):
    """Block ``block`` of every rank meets here. Thread p (< WORLD_SIZE) signals peer p (slot
    [block, rank] of p's pad) and waits for p's signal (slot [block, p] of this rank's pad);
    the other threads hold a replica of these elements and must not touch the slots."""
    peers = tl.arange(0, WORLD_SIZE)
    pads = signal_pad_ptrs.to(tl.pointer_type(tl.uint64))
    remote = tl.load(pads + peers).to(tl.pointer_type(tl.uint32))
    local = tl.load(pads + rank).to(tl.pointer_type(tl.uint32))
    if _thread_id() < WORLD_SIZE:
        _send_signal(remote + block * WORLD_SIZE + rank)
        _wait_signal(local + block * WORLD_SIZE + peers)


@triton.jit
def _one_shot_all_reduce_residual_kernel(
    x_ptr,
    residual_ptr,
    out_ptr,
    buffer_ptrs,
    signal_pad_ptrs,
    numel,
    rank,
    WORLD_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program b: elements [b * BLOCK, (b + 1) * BLOCK) of every rank's partial."""
    block = tl.program_id(0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    buffers = buffer_ptrs.to(tl.pointer_type(tl.uint64))
    own = tl.load(buffers + rank).to(tl.pointer_type(x_ptr.dtype.element_ty))
    tl.store(own + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    # Every thread's store is issued before thread 0..WORLD_SIZE-1 release it to the peers.
    tl.debug_barrier()
    _block_barrier(signal_pad_ptrs, block, rank, WORLD_SIZE)
    tl.debug_barrier()
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for peer in tl.static_range(WORLD_SIZE):  # rank order on every rank: identical sums
        src = tl.load(buffers + peer).to(tl.pointer_type(x_ptr.dtype.element_ty))
        # .cv: fetched anew, never a line cached from the previous call's partial.
        total += tl.load(src + offs, mask=mask, cache_modifier=".cv").to(tl.float32)
    r = tl.load(residual_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (r + total).to(out_ptr.dtype.element_ty), mask=mask)
    # Meet again before leaving, so that no rank's next call overwrites its buffer while a
    # peer is still reading this call's partial from it.
    tl.debug_barrier()
    _block_barrier(signal_pad_ptrs, block, rank, WORLD_SIZE)


# --------------------------------------------------------------------------------------------
# Capability and workspace
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Workspace:
    handle: object  # torch's _SymmetricMemory
    buffer: torch.Tensor
    rank: int
    world_size: int


# (device, group) -> the workspace, or the reason there is none. Checked once per group: the
# check meets the peers (collectives), so every rank must make it at the same point.
_state: dict[tuple, _Workspace | str] = {}


def _group_key(device: torch.device, group) -> tuple:
    return (device, id(group) if group is not None else None)


def _local_reason(device: torch.device, group) -> str | None:
    """Why this rank alone cannot run the kernel (None: it can, as far as it can tell)."""
    try:
        import torch.distributed._symmetric_memory
    except ImportError as exc:
        return f"torch.distributed._symmetric_memory is not available ({exc})"
    world_size = dist.get_world_size(group)
    if world_size > MAX_WORLD_SIZE:
        return f"world size {world_size} > {MAX_WORLD_SIZE}: one-shot all-reduce stops paying"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "the GPU is older than sm_80"
    visible = torch.cuda.device_count()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if visible >= world_size:  # one process per GPU, all GPUs visible: P2P is checkable here
        for other in range(visible):
            if other != index and not torch.cuda.can_device_access_peer(index, other):
                return f"no peer-to-peer access between cuda:{index} and cuda:{other}"
    return None


def _agree(ok: bool, device: torch.device, group) -> bool:
    """True only if every rank of ``group`` says True (ranks must take the same path: one rank
    in the one-shot kernel and another in NCCL would wait for each other forever)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def unavailable_reason(device: torch.device | str, group=None) -> str | None:
    """None when the one-shot kernel can run for ``group`` on ``device`` (the symmetric
    workspace is then set up), else why not.

    On CUDA with an NCCL group this is a collective the first time (every rank of the group
    calls it, as the engine does when it cuts its program into segments); the answer is cached.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"the tensors are on {device.type}: the one-shot kernel needs CUDA tensors and "
            "torch.distributed symmetric memory"
        )
    if INTERPRETING:
        return "Triton runs interpreted (TRITON_INTERPRET=1): the kernel needs compiled Triton"
    if not dist.is_available() or not dist.is_initialized():
        return "no torch.distributed process group"
    backend = dist.get_backend(group)
    if backend != "nccl":
        return f"the process group's backend is {backend}: the one-shot kernel needs NCCL"
    key = _group_key(device, group)
    if key in _state:
        state = _state[key]
        return state if isinstance(state, str) else None
    reason = _local_reason(device, group)
    if not _agree(reason is None, device, group):
        _state[key] = reason or "a peer rank cannot run it (see that rank's reason)"
        return _state[key]
    try:
        _state[key] = _rendezvous(device, group)
        ok = True
    except Exception as exc:  # any failure to map the peers' memory: fall back, say why
        _state[key] = f"symmetric memory rendezvous failed: {type(exc).__name__}: {exc}"
        ok = False
    if not _agree(ok, device, group) and ok:
        _state[key] = "a peer rank failed the symmetric memory rendezvous"
    state = _state[key]
    return state if isinstance(state, str) else None


def _rendezvous(device: torch.device, group) -> _Workspace:
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(ONE_SHOT_MAX_BYTES, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buffer, group if group is not None else dist.group.WORLD)
    return _Workspace(handle, buffer, handle.rank, handle.world_size)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def all_reduce_residual(
    x: torch.Tensor, residual: torch.Tensor, group=None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``residual + sum over the ranks of group of x`` (``out`` may be ``residual``).

    One launch on CUDA with symmetric memory (inputs up to ONE_SHOT_MAX_BYTES; larger ones:
    NCCL all-reduce, then the add). Raises RuntimeError saying why where the kernel cannot run
    (see ``unavailable_reason``); the engine checks first and runs the unfused ops instead.
    Every rank of ``group`` must call it with the same shapes (it meets its peers).
    """
    check_tensor("x", x)
    check_tensor("residual", residual, device=x.device)
    check_same_dtype("x", x, residual=residual)
    if x.shape != residual.shape:
        raise ValueError(
            f"x has shape {tuple(x.shape)} but residual has {tuple(residual.shape)}: they must "
            "match"
        )
    if out is not None:
        check_tensor("out", out, device=x.device)
        check_same_dtype("x", x, out=out)
        if out.shape != residual.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(residual.shape)}")
    reason = unavailable_reason(x.device, group)
    if reason is not None:
        raise RuntimeError(f"all_reduce_residual cannot run here: {reason}")
    if x.numel() * x.element_size() > ONE_SHOT_MAX_BYTES:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return torch.add(residual, x, out=out)
    for name, t in (("x", x), ("residual", residual), ("out", out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernel indexes it flat)")
    ws = _state[_group_key(x.device, group)]
    out = torch.empty_like(residual) if out is None else out
    numel = x.numel()
    if numel == 0:
        return out
    # One signal slot per (block, peer) in each rank's pad: as many blocks as fit.
    max_blocks = ws.handle.signal_pad_size // (4 * ws.world_size)
    block = max(1024, next_pow2(cdiv(numel, max_blocks)))
    _one_shot_all_reduce_residual_kernel[(cdiv(numel, block),)](
        x,
        residual,
        out,
        ws.handle.buffer_ptrs_dev,
        ws.handle.signal_pad_ptrs_dev,
        numel,
        ws.rank,
        WORLD_SIZE=ws.world_size,
        BLOCK=block,
        num_warps=4,
    )
    return out
