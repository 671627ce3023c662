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
  does the one-shot all-reduce, pushing: each rank stores its partial into its own slot of
  every peer's symmetric buffer over NVLink, meets the same block of every peer at one barrier
  on the signal pads, then sums the slots of its own buffer (local reads) in float32 in rank
  order (the same order on every rank: every rank gets the same bits), adds the residual and
  rounds once. Everywhere else (CPU tensors, gloo, Triton's interpreter, no symmetric memory,
  no P2P) the launcher raises an error saying why, and the engine runs the unfused path
  instead (with a warning). ``unavailable_reason`` says which.

One barrier per call. Each rank's buffer has two halves, each with one slot per source rank,
each slot cut into fixed block regions: program b of every call owns region b of every half
and slot (whatever the call's size), and its flags, slot [b, peer] of each pad. Per rank a
zero-initialised int32 epoch per block (its own memory, allocated with the workspace) counts
the calls block b has run in; call e of block b writes half e & 1, stores e (release, system
scope) in every peer's flag [b, rank], waits until its own flags [b, p] have reached e
(acquire; a peer may be one call ahead, never two), sums, and saves e. Why the halves cannot
be overwritten while read: rank A writes half (e+1) & 1 = (e-1) & 1 of peer B's buffer in
call e+1 only after passing barrier e, which needed B's flag e, which B's block b stores only
in its kernel of call e, launched after B's kernel of call e-1 (the one that read that half)
completed: stream order. That needs the kernel NOT to be launched with programmatic dependent
launch (it is not: no ``launch_pdl``; a PDL launch could start it before the previous kernel
has finished reading). It also needs the epochs to advance identically on every rank: every
rank makes the same calls with the same shapes, so the same blocks run (the grid depends on
numel, so block b's epoch advances only in calls where block b runs; still identically on
every rank). Hence the fixed regions: were block b's data at b x BLOCK (BLOCK varies with
numel), a block of one call could overwrite data that another block index of the previous
call, whose flags it never waited for, was still reading. The epochs live on the device, so
CUDA graph replays advance them like eager calls. Stream order is the only order between one
rank's calls: every call of a group must go to the same stream (or streams ordered by events),
as the engine's do; two calls in flight at once on unordered streams could meet the wrong
epochs.

Measured on two H100s (NVLink), in a CUDA graph: 4.2-4.8 µs a call at decode sizes ([1..8,
1024..4096] bf16) against 7.7-8.7 µs for NCCL's all-reduce + the add, and correct against the
float64 reference back to back, with ranks late in turn and under graph replays
(tests/test_tensor_parallel.py, marked gpu; docs/notes.md has the figures).

NVLink multicast (NVLS, ``multimem`` instructions) is never used: peers are written with
ordinary stores through their P2P mappings, and engine/parallel.py switches multicast off in
the environment before any process group exists.
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
# ones (prefill) all-reduce with NCCL and then add, since sending every peer this rank's whole
# partial (world_size x the data per rank) stops paying once the copy is bandwidth-bound. It
# is also the size of each source rank's slot in each half of every rank's symmetric buffer
# (2 x world_size slots), allocated once: a CUDA graph captured later never allocates or meets
# its peers again.
ONE_SHOT_MAX_BYTES = 1 << 20
# One-shot all-reduce reads every peer: beyond one NVLink domain of 8 GPUs it stops paying.
MAX_WORLD_SIZE = 8
# Each program owns a fixed region (at least 8 KB) of every half and source slot of the buffer;
# at most this many regions (ONE_SHOT_MAX_BYTES // 8 KB), fewer where the signal pad has no
# flags for more.
MAX_SLOTS = 128
# The smallest program (elements): a 2 KB partial is one program of 16 bytes a thread.
MIN_BLOCK = 1024


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
def _put_flag(addrs, epoch):
    """Store ``epoch`` in each slot, release at system scope: this block's stores before it
    (the other threads' too, ordered by the block barrier before) are visible to whoever
    acquires the flag."""
    tl.inline_asm_elementwise(
        """
        {
            mov.u32 $0, 0;
            st.release.sys.global.u32 [$1], $2;
        }
        """,
        "=r, l, r",
        [addrs, epoch],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _wait_flag(addrs, epoch):
    """Spin until each slot has reached ``epoch`` (acquire at system scope: the peer's stores
    before its flag are visible after). Reached, not equal: a peer may already be one call
    ahead; the int32 difference keeps the test right across wrap-around."""
    tl.inline_asm_elementwise(
        """
        {
            .reg .u32 %flag;
            .reg .s32 %ahead;
            .reg .pred %behind;
            wait_flag:
                ld.acquire.sys.global.u32 %flag, [$1];
                sub.s32 %ahead, %flag, $2;
                setp.lt.s32 %behind, %ahead, 0;
                @%behind bra wait_flag;
            mov.u32 $0, %flag;
        }
        """,
        "=r, l, r",
        [addrs, epoch],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _block_barrier(signal_pad_ptrs, block, rank, epoch, WORLD_SIZE: tl.constexpr):
    """Block ``block`` of every rank meets here at ``epoch``. Thread p (< WORLD_SIZE) stores
    the epoch in peer p's slot [block, rank] and waits until its own slot [block, p] has
    reached it. Threads holding a replica of these elements do the same again, harmlessly
    (storing the same epoch is idempotent), but the others stay off the slots."""
    peers = tl.arange(0, WORLD_SIZE)
    pads = signal_pad_ptrs.to(tl.pointer_type(tl.uint64))
    remote = tl.load(pads + peers).to(tl.pointer_type(tl.uint32))
    local = tl.load(pads + rank).to(tl.pointer_type(tl.uint32))
    if _thread_id() < WORLD_SIZE:
        _put_flag(remote + block * WORLD_SIZE + rank, epoch)
        _wait_flag(local + block * WORLD_SIZE + peers, epoch)


@triton.jit
def _slot(buffer_addr, half, source, block, SLOTS: tl.constexpr, REGION: tl.constexpr, WORLD_SIZE):
    """Block ``block``'s region of ``source``'s partial in ``half`` of a rank's buffer (element
    pointer; ``REGION`` elements, the same bytes whatever the dtype)."""
    index = (half * WORLD_SIZE + source) * SLOTS + block
    return buffer_addr + index.to(tl.int64) * REGION


@triton.jit
def _one_shot_all_reduce_residual_kernel(
    x_ptr,
    residual_ptr,
    out_ptr,
    buffer_ptrs,
    signal_pad_ptrs,
    epoch_ptr,
    numel,
    rank,
    WORLD_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    SLOTS: tl.constexpr,
    REGION: tl.constexpr,
):
    """Program b: elements [b * BLOCK, (b + 1) * BLOCK) of every rank's partial (push mode:
    each rank stores its slice into every peer's buffer, meets them once, sums locally)."""
    block = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    offs = block * BLOCK + idx
    mask = offs < numel
    dtype = x_ptr.dtype.element_ty
    # This block's epoch: the calls it has run in, this one included (the same on every rank).
    epoch = tl.load(epoch_ptr + block) + 1
    half = epoch & 1
    buffers = buffer_ptrs.to(tl.pointer_type(tl.uint64))
    x = tl.load(x_ptr + offs, mask=mask)
    for peer in tl.static_range(WORLD_SIZE):
        if peer != rank:
            # The allocation is aligned and regions are multiples of 16 bytes: the hint lets
            # Triton store 16-byte vectors over NVLink (unhinted, it stores element by element).
            base = tl.multiple_of(tl.load(buffers + peer).to(tl.pointer_type(dtype)), 16)
            dst = _slot(base, half, rank, block, SLOTS, REGION, WORLD_SIZE)
            tl.store(dst + idx, x, mask=mask)
    # Every thread's stores are issued before threads 0..WORLD_SIZE-1 release them.
    tl.debug_barrier()
    _block_barrier(signal_pad_ptrs, block, rank, epoch, WORLD_SIZE)
    tl.debug_barrier()
    own = tl.multiple_of(tl.load(buffers + rank).to(tl.pointer_type(dtype)), 16)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for peer in tl.static_range(WORLD_SIZE):  # rank order on every rank: identical sums
        if peer == rank:
            term = x.to(tl.float32)
        else:
            src = _slot(own, half, peer, block, SLOTS, REGION, WORLD_SIZE)
            # .cv: fetched anew (the peer wrote it over NVLink), never a stale cached line.
            term = tl.load(src + idx, mask=mask, cache_modifier=".cv").to(tl.float32)
        total += term
    r = tl.load(residual_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (r + total).to(out_ptr.dtype.element_ty), mask=mask)
    # Read only by this block's next call, a later kernel in stream order.
    tl.store(epoch_ptr + block, epoch)


# --------------------------------------------------------------------------------------------
# Capability and workspace
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """How each rank's symmetric buffer is cut: ``slots`` block regions of ``region_bytes``
    per (half, source rank); block b owns region b of every one, whatever the call's size."""

    slots: int
    region_bytes: int

    def buffer_bytes(self, world_size: int) -> int:
        return 2 * world_size * self.slots * self.region_bytes


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    block: int  # elements per program (a power of two, at most one region)
    blocks: int  # the grid
    num_warps: int


def buffer_layout(signal_pad_size: int, world_size: int) -> BufferLayout:
    """The most block regions the signal pad has flags for (one int32 per block per peer),
    at most MAX_SLOTS, a power of two, together holding ONE_SHOT_MAX_BYTES per source rank."""
    capacity = signal_pad_size // (4 * world_size)
    if capacity < 1:
        raise ValueError(
            f"the signal pad ({signal_pad_size} bytes) has no room for one block's flags from "
            f"{world_size} ranks"
        )
    slots = min(MAX_SLOTS, 1 << (capacity.bit_length() - 1))
    return BufferLayout(slots, ONE_SHOT_MAX_BYTES // slots)


def launch_shape(numel: int, element_size: int, layout: BufferLayout) -> LaunchShape:
    """As few programs as the regions allow: each pays a flag round trip with every peer, so a
    decode partial (2-64 KB) takes one to eight. ``numel * element_size`` must be at most
    ONE_SHOT_MAX_BYTES (then the blocks fit the slots)."""
    if numel < 1 or numel * element_size > ONE_SHOT_MAX_BYTES:
        raise ValueError(f"{numel} elements of {element_size} bytes: not a one-shot size")
    region = layout.region_bytes // element_size
    block = min(region, max(MIN_BLOCK, next_pow2(numel)))
    blocks = cdiv(numel, block)
    assert blocks <= layout.slots, (numel, element_size, layout)
    # ~32 bytes a thread (two 16-byte vectors per peer), 4 to 16 warps.
    num_warps = min(16, max(4, block * element_size // 1024))
    return LaunchShape(block, blocks, num_warps)


@dataclasses.dataclass
class _Workspace:
    handle: object  # torch's _SymmetricMemory
    buffer: torch.Tensor
    rank: int
    world_size: int
    layout: BufferLayout
    # Per block: the calls it has run in (this rank's own memory, not symmetric).
    epochs: torch.Tensor


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

    world_size = dist.get_world_size(group)
    # Two halves of one ONE_SHOT_MAX_BYTES slot per source rank, however the pad cuts them.
    buffer = symm_mem.empty(2 * world_size * ONE_SHOT_MAX_BYTES, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buffer, group if group is not None else dist.group.WORLD)
    layout = buffer_layout(handle.signal_pad_size, handle.world_size)
    assert layout.buffer_bytes(handle.world_size) == buffer.numel()
    epochs = torch.zeros(layout.slots, dtype=torch.int32, device=device)
    return _Workspace(handle, buffer, handle.rank, handle.world_size, layout, epochs)


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
    shape = launch_shape(numel, x.element_size(), ws.layout)
    # Never launched with programmatic dependent launch: the buffer reuse is safe only because
    # this kernel starts after the previous one on the stream has completed (module docstring).
    _one_shot_all_reduce_residual_kernel[(shape.blocks,)](
        x,
        residual,
        out,
        ws.handle.buffer_ptrs_dev,
        ws.handle.signal_pad_ptrs_dev,
        ws.epochs,
        numel,
        ws.rank,
        WORLD_SIZE=ws.world_size,
        BLOCK=shape.block,
        SLOTS=ws.layout.slots,
        REGION=ws.layout.region_bytes // x.element_size(),
        num_warps=shape.num_warps,
    )
    return out
