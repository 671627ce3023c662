"""Qwen3's q/k RMSNorm + RoPE + KV-cache write, in one launch.

Input: the merged projection ``qkv`` [T, (H + 2*Hkv) * D] (q heads, then k heads, then v
heads). Per token t (sequence b = t // tokens_per_seq, position p = positions[t]):
- q heads: RMSNorm over D with q_norm_weight, then RoPE at p, written back IN PLACE into qkv
  (attention reads q from there);
- k heads: RMSNorm with k_norm_weight, then RoPE, written to k_cache[b, :, p, :];
- v heads: copied to v_cache[b, :, p, :].

Positions come from a device tensor, so a captured CUDA graph writes where the live sequence
ends. RoPE is the rotate-half form of transformers (non-interleaved), with float32 cos/sin
tables [max_positions, D/2] (the halves of transformers' cat(freqs, freqs)).

Rounding: transformers rounds the normed value to the input dtype, multiplies by the weight
(rounded again), and applies RoPE in the input dtype. Here the norm follows its rounding and
RoPE is computed in float32 and rounded once: within an ulp or two of it in bf16, equal in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_checks import (
    check_runnable_device,
    check_same_dtype,
    check_tensor,
)
from kernels.runtime import INTERPRETING, pdl_options, pdl_supported

# Kernels that issue global loads before their PDL wait (checked on the compiled PTX).
READS_BEFORE_WAIT = ("_qk_norm_rope_kernel",)

# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _norm_rope(x1, x2, w1, w2, cos, sin, eps, HALF: tl.constexpr, DTYPE: tl.constexpr):
    """RMSNorm over the two halves [heads, HALF] of each head, then rotate-half RoPE."""
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
    n1 = (x1 * rstd[:, None]).to(DTYPE).to(tl.float32)
    n2 = (x2 * rstd[:, None]).to(DTYPE).to(tl.float32)
    n1 = (n1 * w1[None, :]).to(DTYPE).to(tl.float32)
    n2 = (n2 * w2[None, :]).to(DTYPE).to(tl.float32)
    return n1 * cos[None, :] - n2 * sin[None, :], n2 * cos[None, :] + n1 * sin[None, :]


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    q_norm_w_ptr,
    k_norm_w_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tokens_per_seq,
    stride_qkv_t,
    stride_table,
    stride_cache_b,
    stride_cache_h,
    stride_cache_s,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Program (t, g): token t's q heads [g * BLOCK_H, ...) for g < cdiv(H, BLOCK_H), else its
    k and v heads [(g - that) * BLOCK_KV, ...). At decode every head has its own program.

    With PDL (Hopper) the next kernel may launch at once, and everything the previous kernel
    does not write is read before waiting for it: the norm weights, the position and its
    cos/sin row. After the wait a program loads its heads of qkv (one memory round trip),
    computes and stores."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    g = tl.program_id(1)
    q_blocks = tl.cdiv(NUM_HEADS, BLOCK_H)
    d = tl.arange(0, HALF)
    is_q = g < q_blocks
    w_ptr = tl.where(is_q, q_norm_w_ptr, k_norm_w_ptr)
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    b = t // tokens_per_seq
    pos = tl.load(positions_ptr + t).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_table + d)
    sin = tl.load(sin_ptr + pos * stride_table + d)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    dtype = qkv_ptr.dtype.element_ty
    row = qkv_ptr + t.to(tl.int64) * stride_qkv_t
    if is_q:
        # q heads: normalise, rotate, write back in place.
        heads = g * BLOCK_H + tl.arange(0, BLOCK_H)
        q_mask = (heads < NUM_HEADS)[:, None]
        q_ptrs = row + heads[:, None] * (2 * HALF) + d[None, :]
        q1 = tl.load(q_ptrs, mask=q_mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_ptrs + HALF, mask=q_mask, other=0.0).to(tl.float32)
        q1, q2 = _norm_rope(q1, q2, w1, w2, cos, sin, eps, HALF, dtype)
        tl.store(q_ptrs, q1.to(dtype), mask=q_mask)
        tl.store(q_ptrs + HALF, q2.to(dtype), mask=q_mask)
    else:
        # k heads: normalise, rotate, write to the cache at (b, head, pos); v heads: copy.
        kv_heads = (g - q_blocks) * BLOCK_KV + tl.arange(0, BLOCK_KV)
        kv_mask = (kv_heads < NUM_KV_HEADS)[:, None]
        k_ptrs = row + (NUM_HEADS + kv_heads[:, None]) * (2 * HALF) + d[None, :]
        v_ptrs = k_ptrs + NUM_KV_HEADS * (2 * HALF)
        k1 = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptrs + HALF, mask=kv_mask, other=0.0).to(tl.float32)
        v1 = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        v2 = tl.load(v_ptrs + HALF, mask=kv_mask, other=0.0)
        k1, k2 = _norm_rope(k1, k2, w1, w2, cos, sin, eps, HALF, dtype)
        cache_offs = (
            b.to(tl.int64) * stride_cache_b
            + kv_heads[:, None] * stride_cache_h
            + pos * stride_cache_s
            + d[None, :]
        )
        tl.store(k_cache_ptr + cache_offs, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(k_cache_ptr + cache_offs + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache_ptr + cache_offs, v1, mask=kv_mask)
        tl.store(v_cache_ptr + cache_offs + HALF, v2, mask=kv_mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _check(qkv, q_norm_weight, k_norm_weight, cos, sin, positions, k_cache, v_cache, H, Hkv, D):
    check_tensor("qkv", qkv, dim=2)
    check_runnable_device("qkv", qkv)
    dev = qkv.device
    for name, t in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        check_tensor(name, t, dim=1, device=dev)
        if t.shape[0] != D:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{D}] (head_dim)")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, dim=2, dtypes=(torch.float32,), device=dev)
        if t.shape[1] != D // 2:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [positions, {D // 2}]")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    check_tensor("positions", positions, dim=1, dtypes=(torch.int32, torch.int64), device=dev)
    if positions.shape[0] != qkv.shape[0]:
        raise ValueError(
            f"positions has {positions.shape[0]} entries but qkv has {qkv.shape[0]} tokens"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dim=4, device=dev)
        if t.shape[1] != Hkv or t.shape[3] != D:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected [batch, {Hkv}, max_seq_len, {D}]"
            )
    check_same_dtype("qkv", qkv, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if qkv.shape[1] != (H + 2 * Hkv) * D:
        raise ValueError(
            f"qkv has shape {tuple(qkv.shape)}; expected [tokens, {(H + 2 * Hkv) * D}] "
            f"((num_heads + 2 * num_kv_heads) * head_dim)"
        )
    if D < 2 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 2, got {D}")


# At most this many tokens, one head a program (the kernel is a latency: more programs,
# shorter chains); above it, and under the interpreter (which pays per program), a token's
# q heads share one program and its k/v heads another. Measured in CUDA-graph decode
# (docs/notes.md): one head a program gains at batch 1 and loses 2% at batch 8.
PER_HEAD_MAX_TOKENS = 1


def _heads_per_program(tokens: int, num_heads: int, num_kv_heads: int, interpreting: bool):
    """(q heads, k/v heads) a program handles."""
    if tokens <= PER_HEAD_MAX_TOKENS and not interpreting:
        return 1, 1
    return triton.next_power_of_2(num_heads), triton.next_power_of_2(num_kv_heads)


def qk_norm_rope_cache_write(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    tokens_per_seq: int,
    eps: float,
) -> torch.Tensor:
    """Normalise + rotate q (in place in ``qkv``) and k, write k and v into the caches.

    qkv [T, (H+2Hkv)*D]; positions [T] (device, int32/int64); caches [B, Hkv, S, D]; token t
    belongs to sequence t // tokens_per_seq. Positions must be < S and < len(cos) (not checked
    on the device: that would need a host sync). Returns qkv.

    On Hopper the kernel reads ``positions``, the cos/sin tables and the norm weights before
    waiting for the previous kernel: they must not be written by a kernel of the same
    programmatic-dependent-launch chain (the engine writes positions with torch ops, which
    end a chain); qkv may be.
    """
    _check(
        qkv,
        q_norm_weight,
        k_norm_weight,
        cos,
        sin,
        positions,
        k_cache,
        v_cache,
        num_heads,
        num_kv_heads,
        head_dim,
    )
    T = qkv.shape[0]
    if T == 0:
        return qkv
    if tokens_per_seq < 1 or tokens_per_seq * k_cache.shape[0] < T:
        raise ValueError(
            f"{T} tokens at tokens_per_seq={tokens_per_seq} need more sequences than the "
            f"cache's {k_cache.shape[0]}"
        )
    use_pdl = pdl_supported(qkv.device)
    block_h, block_kv = _heads_per_program(T, num_heads, num_kv_heads, INTERPRETING)
    groups = triton.cdiv(num_heads, block_h) + triton.cdiv(num_kv_heads, block_kv)
    _qk_norm_rope_kernel[(T, groups)](
        qkv,
        q_norm_weight,
        k_norm_weight,
        cos,
        sin,
        positions,
        k_cache,
        v_cache,
        tokens_per_seq,
        qkv.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        eps,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=head_dim // 2,
        BLOCK_H=block_h,
        BLOCK_KV=block_kv,
        USE_PDL=use_pdl,
        num_warps=1 if block_h == 1 else 4,
        **pdl_options(use_pdl),
    )
    return qkv


# --------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_positions: int, theta: float, device=None):
    """float32 cos/sin [max_positions, head_dim/2], computed as transformers does."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    return freqs.cos(), freqs.sin()


def qk_norm_rope_reference(
    qkv,
    q_norm_weight,
    k_norm_weight,
    cos,
    sin,
    positions,
    *,
    num_heads,
    num_kv_heads,
    head_dim,
    eps,
):
    """(q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]) in transformers' op order and rounding."""
    T, dtype = qkv.shape[0], qkv.dtype
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )

    acc = torch.promote_types(dtype, torch.float32)

    def norm(x, w):
        xa = x.to(acc)
        normed = (xa * torch.rsqrt(xa.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        return w.to(dtype) * normed

    def rope(x):
        p = positions.long()
        c = torch.cat([cos[p], cos[p]], dim=-1).to(dtype)[:, None, :]
        s = torch.cat([sin[p], sin[p]], dim=-1).to(dtype)[:, None, :]
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    q = rope(norm(q.reshape(T, num_heads, head_dim), q_norm_weight))
    k = rope(norm(k.reshape(T, num_kv_heads, head_dim), k_norm_weight))
    return q, k, v.reshape(T, num_kv_heads, head_dim)
