"""Decode attention over a KV cache: one new query token per sequence, GQA aware.

    out[b, h] = softmax(q[b, h] . k_cache[b, h // G, :L_b] * scale) @ v_cache[b, h // G, :L_b]
    with L_b = positions[b] + 1 (the new token's k/v is already in the cache)

The lengths are read from a device tensor, so a captured CUDA graph attends to the live
length of each sequence at replay, and the work is what the live length costs, not the cache
capacity (SDPA over the padded cache would read all of it every step).

Flash-decoding style, one program per (sequence, KV head): the G = H / Hkv query heads that
share a KV head are processed together (rows of one tile, padded to 16 for tl.dot), so each
K/V block is read once per KV head; the online softmax keeps one pass over the cache. No
split-KV combine kernel: at the decode lengths of this engine (hundreds of tokens) one pass
per KV head is short and a second launch per layer would cost more than it saves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_checks import check_runnable_device, check_same_dtype, check_tensor
from kernels.runtime import INTERPRETING, pdl_options, pdl_supported

LOG2E = 1.4426950408889634
# Kernels that issue global loads before their PDL wait (checked on the compiled PTX).
READS_BEFORE_WAIT = ("_decode_attention_kernel",)
# Kernels that let the next one launch only after their wait (measured: the next kernel's
# weight stream slowed their loads).
TRIGGER_AFTER_WAIT = ("_decode_attention_kernel",)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _attend(q, k, v, n_mask, m_i, l_i, acc, scale_log2e, IEEE_FP32: tl.constexpr):
    """One K/V block of the online softmax: the running max, sum and output, updated."""
    if IEEE_FP32:  # noqa: SIM108  (constexpr branch, kept explicit)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(n_mask[None, :], s * scale_log2e, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE_FP32:  # noqa: SIM108
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    positions_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_ob,
    stride_oh,
    scale_log2e,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (b, kv_head). Before waiting for the previous kernel (PDL), which wrote q and
    the new token's k/v row, it reads what that kernel does not write: the position and the
    first K/V block's older rows (written by earlier steps). After the wait only q and the
    new row are loaded before the first block is attended: one memory round trip, not three
    (position, then the block, after the wait)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    pos = tl.load(positions_ptr + b).to(tl.int32)
    length = pos + 1
    g = tl.arange(0, BLOCK_G)
    g_mask = (g < GROUP)[:, None]
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    kv_base = b.to(tl.int64) * stride_cb + kv_head.to(tl.int64) * stride_ch
    n = tl.arange(0, BLOCK_N)
    older = (n < pos)[:, None]
    kv_offs = kv_base + n[:, None] * stride_cs + d[None, :]
    k = tl.load(k_cache_ptr + kv_offs, mask=older, other=0.0)
    v = tl.load(v_cache_ptr + kv_offs, mask=older, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        # Only now let the next kernel (o_proj) launch: its weight stream, started earlier,
        # slowed these loads (H100 A/B: 1.054x decode at batch 1 over triggering at start).
        tl.extra.cuda.gdc_launch_dependents()
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask,
        other=0.0,
    )
    new_offs = kv_base + pos.to(tl.int64) * stride_cs + d
    k_new = tl.load(k_cache_ptr + new_offs)
    v_new = tl.load(v_cache_ptr + new_offs)
    is_new = (n == pos)[:, None]  # the new row, when it falls in the first block
    k = tl.where(is_new, k_new[None, :], k)
    v = tl.where(is_new, v_new[None, :], v)
    if UPCAST_DOT:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    m_i, l_i, acc = _attend(q, k, v, n < length, m_i, l_i, acc, scale_log2e, IEEE_FP32)
    for start in range(BLOCK_N, length, BLOCK_N):  # longer contexts: after the wait
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < length
        kv_offs = kv_base + n[:, None] * stride_cs + d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=n_mask[:, None], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        m_i, l_i, acc = _attend(q, k, v, n_mask, m_i, l_i, acc, scale_log2e, IEEE_FP32)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask,
    )


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _block_n(max_seq_len: int, interpreting: bool) -> int:
    """K/V rows a block: 64 on the GPU; the interpreter pays per loop iteration, so it covers
    the cache in one block (up to 1024 rows)."""
    return min(1024, triton.next_power_of_2(max_seq_len)) if interpreting else 64


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its cached keys/values.

    q [B, H, D] (any batch/head strides); k_cache, v_cache [B_cache >= B, Hkv, S, D];
    positions [B] (device, int32/int64): sequence b attends to cache positions
    0..positions[b]. Returns out [B, H, D] (contiguous). Positions must be < S (not checked
    on the device: that would need a host sync).

    On Hopper the kernel reads ``positions`` and the cache rows below each position before
    waiting for the previous kernel: those must not be written by a kernel of the same
    programmatic-dependent-launch chain (the engine writes them with torch ops, which end a
    chain); the new row at the position and q may be.
    """
    check_tensor("q", q, dim=3)
    check_runnable_device("q", q)
    check_tensor("k_cache", k_cache, dim=4, device=q.device)
    check_tensor("v_cache", v_cache, dim=4, device=q.device)
    check_same_dtype("q", q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("positions", positions, dim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.shape[3] != D or k_cache.shape[0] < B:
        raise ValueError(
            f"k_cache has shape {tuple(k_cache.shape)}; expected [>= {B}, Hkv, max_seq_len, {D}]"
        )
    if H % Hkv:
        raise ValueError(f"q has {H} heads, not a multiple of the cache's {Hkv} KV heads")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if positions.shape[0] != B:
        raise ValueError(f"positions has {positions.shape[0]} entries; expected {B} (batch)")
    if out is None:
        out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    else:
        check_tensor("out", out, dim=3, device=q.device)
        check_same_dtype("q", q, out=out)
        if tuple(out.shape) != (B, H, D):
            raise ValueError(f"out has shape {tuple(out.shape)}; expected {(B, H, D)}")
    if B == 0:
        return out
    group = H // Hkv
    scale = D**-0.5 if scale is None else scale
    block_n = _block_n(k_cache.shape[2], INTERPRETING)
    use_pdl = pdl_supported(q.device)
    _decode_attention_kernel[(B, Hkv)](
        q,
        k_cache,
        v_cache,
        positions,
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        scale * LOG2E,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D,
        BLOCK_N=block_n,
        UPCAST_DOT=INTERPRETING and q.dtype != torch.float32,
        IEEE_FP32=q.dtype == torch.float32,
        USE_PDL=use_pdl,
        num_warps=4,
        num_stages=2,
        **pdl_options(use_pdl),
    )
    return out


# --------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------


def decode_attention_reference(q, k_cache, v_cache, positions, *, scale=None):
    """Per sequence: softmax attention over cache positions 0..positions[b], in float32 (in
    float64 for float64 inputs: the float64 formula)."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    outs = []
    for b in range(B):
        length = int(positions[b]) + 1
        k = k_cache[b, :, :length].to(acc).repeat_interleave(group, dim=0)
        v = v_cache[b, :, :length].to(acc).repeat_interleave(group, dim=0)
        weights = torch.softmax((q[b].to(acc)[:, None, :] @ k.transpose(1, 2)) * scale, dim=-1)
        outs.append((weights @ v)[:, 0])
    return torch.stack(outs).to(q.dtype)
