"""q/k RMSNorm + RoPE + KV-cache write kernel vs float64 and the torch reference."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES, assert_close_to_reference

from kernels.qk_norm_rope import qk_norm_rope_cache_write, qk_norm_rope_reference, rope_tables

EPS = 1e-6
# (num_heads, num_kv_heads, head_dim): Qwen3-0.6B, a small GQA one, MHA with few heads.
HEADS = [(16, 8, 128), (4, 2, 16), (3, 3, 32)]


@pytest.fixture(params=["per-head", "grouped"])
def heads_per_program(request, monkeypatch):
    """Both program layouts: one head a program (the GPU's) and all q heads in one program,
    all k/v heads in another (the interpreter's), whatever runs the test."""
    import kernels.qk_norm_rope as module

    layout = module._heads_per_program
    interpreting = request.param == "grouped"
    if not interpreting:  # every token count of these tests takes one head a program
        monkeypatch.setattr(module, "PER_HEAD_MAX_TOKENS", 1 << 20)
    monkeypatch.setattr(module, "_heads_per_program", lambda *a: layout(*a[:3], interpreting))
    return request.param


def _run(H, Hkv, D, dtype, device, *, batch, tokens_per_seq, positions):
    T = batch * tokens_per_seq
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device).to(dtype)
    q_w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
    k_w = (1 + 0.3 * torch.randn(D, device=device)).to(dtype)
    cos, sin = rope_tables(D, 512, 1e6, device=device)
    max_seq = 64
    k_cache = torch.full((batch + 1, Hkv, max_seq, D), float("nan"), device=device).to(dtype)
    v_cache = k_cache.clone()
    original = qkv.clone()
    kwargs = {"num_heads": H, "num_kv_heads": Hkv, "head_dim": D, "eps": EPS}
    qk_norm_rope_cache_write(
        qkv,
        q_w,
        k_w,
        cos,
        sin,
        positions,
        k_cache,
        v_cache,
        tokens_per_seq=tokens_per_seq,
        **kwargs,
    )
    ref = qk_norm_rope_reference(original, q_w, k_w, cos, sin, positions, **kwargs)
    exact = qk_norm_rope_reference(
        original.double(),
        q_w.double(),
        k_w.double(),
        cos.double(),
        sin.double(),
        positions,
        **kwargs,
    )
    return qkv, original, k_cache, v_cache, ref, exact


def _head_scale(x):
    """RoPE mixes the two halves of a head: ulps count at the head's largest element."""
    return x.abs().amax(-1, keepdim=True).expand_as(x)


def _check(got, ref, exact, what):
    assert_close_to_reference(got, ref, exact, what=what, magnitude=_head_scale(exact))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize(("H", "Hkv", "D"), HEADS, ids=lambda v: str(v))
def test_prefill_layout(H, Hkv, D, dtype_name, device, heads_per_program):
    """Two sequences of 5 tokens at positions 0..4, as in prefill."""
    dtype, batch, P = DTYPES[dtype_name], 2, 5
    positions = torch.arange(P, device=device, dtype=torch.int32).repeat(batch)
    qkv, original, k_cache, v_cache, ref, exact = _run(
        H, Hkv, D, dtype, device, batch=batch, tokens_per_seq=P, positions=positions
    )
    q_got = qkv[:, : H * D].view(-1, H, D)
    _check(q_got, ref[0], exact[0], f"q {dtype_name}")
    # k/v of token (b, p) land at cache[b, :, p].
    k_got = k_cache[:batch, :, :P].permute(0, 2, 1, 3).reshape(-1, Hkv, D)
    v_got = v_cache[:batch, :, :P].permute(0, 2, 1, 3).reshape(-1, Hkv, D)
    _check(k_got, ref[1], exact[1], f"k {dtype_name}")
    assert torch.equal(v_got, ref[2]), "v must be copied bit for bit"
    # k and v sections of qkv are left as they were; nothing else in the cache is written.
    assert torch.equal(qkv[:, H * D :], original[:, H * D :])
    assert k_cache[:batch, :, P:].isnan().all() and k_cache[batch:].isnan().all()
    assert v_cache[:batch, :, P:].isnan().all() and v_cache[batch:].isnan().all()


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_decode_layout_reads_positions_from_device(dtype_name, device, heads_per_program):
    """One token per sequence, each at its own position (as in decode)."""
    H, Hkv, D = 4, 2, 16
    positions = torch.tensor([0, 37, 63], device=device, dtype=torch.int32)
    qkv, _, k_cache, v_cache, ref, exact = _run(
        H, Hkv, D, DTYPES[dtype_name], device, batch=3, tokens_per_seq=1, positions=positions
    )
    _check(qkv[:, : H * D].view(-1, H, D), ref[0], exact[0], "q")
    for b, p in enumerate(positions.tolist()):
        _check(k_cache[b, :, p], ref[1][b], exact[1][b], f"k seq {b}")
        assert torch.equal(v_cache[b, :, p], ref[2][b])
        written = torch.zeros(k_cache.shape[2], dtype=torch.bool)
        written[p] = True
        assert k_cache[b, :, ~written].isnan().all(), f"stray cache writes in sequence {b}"


def test_errors_name_the_argument(device):
    H, Hkv, D = 4, 2, 16
    qkv = torch.randn(3, (H + 2 * Hkv) * D, device=device)
    w = torch.ones(D, device=device)
    cos, sin = rope_tables(D, 64, 1e4, device=device)
    positions = torch.zeros(3, dtype=torch.int32, device=device)
    cache = torch.zeros(3, Hkv, 8, D, device=device)
    kw = {"num_heads": H, "num_kv_heads": Hkv, "head_dim": D, "tokens_per_seq": 1, "eps": EPS}

    def call(**over):
        args = {
            "qkv": qkv,
            "q_norm_weight": w,
            "k_norm_weight": w,
            "cos": cos,
            "sin": sin,
            "positions": positions,
            "k_cache": cache,
            "v_cache": cache.clone(),
        }
        args.update(over)
        return qk_norm_rope_cache_write(*args.values(), **kw)

    with pytest.raises(ValueError, match="qkv has shape"):
        call(qkv=qkv[:, :-D])
    with pytest.raises(ValueError, match="k_norm_weight has shape"):
        call(k_norm_weight=w[:8])
    with pytest.raises(TypeError, match="cos has dtype"):
        call(cos=cos.double())
    with pytest.raises(TypeError, match="positions has dtype"):
        call(positions=positions.float())
    with pytest.raises(ValueError, match="positions has 2 entries"):
        call(positions=positions[:2])
    with pytest.raises(ValueError, match="v_cache has shape"):
        call(v_cache=cache[:, :1].clone())
    with pytest.raises(TypeError, match="k_cache has dtype"):
        call(k_cache=cache.half())
