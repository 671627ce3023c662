"""Decode attention kernel vs float64 attention over the live length of each sequence."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DTYPES

from kernels.decode_attention import decode_attention, decode_attention_reference

# (num_heads, num_kv_heads, head_dim, max_seq_len)
CASES = [(16, 8, 128, 300), (4, 2, 16, 40), (8, 2, 32, 70), (4, 4, 64, 17)]
# Attention mixes values with weights that sum to 1: the fp32 result is as exact as the
# inputs (1e-5 covers accumulation over a few hundred keys); bf16/fp16 round p before the
# p @ v product, as flash attention does: a few ulps of a value of size ~1.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(params=["gpu-blocks", "interpreter-blocks"])
def block_layout(request, monkeypatch, device):
    """Both K/V block sizes on the CPU: the GPU's 64 rows (the new row in a later block at
    long positions) and the interpreter's one block over the whole cache (on a GPU only the
    GPU's: the interpreter's blocks do not fit its shared memory at long caches)."""
    import kernels.decode_attention as module

    if request.param == "interpreter-blocks" and torch.device(device).type == "cuda":
        pytest.skip("the interpreter's block layout runs under the interpreter only")

    block_n = module._block_n
    interpreting = request.param == "interpreter-blocks"
    monkeypatch.setattr(module, "_block_n", lambda rows, _: block_n(rows, interpreting))
    return request.param


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize(("H", "Hkv", "D", "S"), CASES, ids=lambda v: str(v))
def test_matches_reference_over_live_length(H, Hkv, D, S, dtype_name, device, block_layout):
    dtype = DTYPES[dtype_name]
    B = 3
    positions = torch.tensor([0, S // 2, S - 1], dtype=torch.int32, device=device)
    k_cache = torch.randn(B + 1, Hkv, S, D, device=device).to(dtype)
    v_cache = torch.randn(B + 1, Hkv, S, D, device=device).to(dtype)
    for b, p in enumerate(positions.tolist()):
        # Poison what lies beyond the live length: reading it would make NaN.
        k_cache[b, :, p + 1 :] = float("nan")
        v_cache[b, :, p + 1 :] = float("nan")
    # q of a strided view, as the engine passes it (q heads of the merged qkv rows).
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device=device).to(dtype)
    q = qkv[:, : H * D].view(B, H, D)
    out = torch.full((B, H, D), float("nan"), device=device).to(dtype)
    got = decode_attention(q, k_cache, v_cache, positions, out=out)
    assert got is out
    exact = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), positions)
    assert torch.isfinite(got).all(), "NaN: the kernel read past a sequence's live length"
    err = (got.double() - exact).abs().max().item()
    assert err < TOLERANCE[dtype], f"max |err| {err:.3g} >= {TOLERANCE[dtype]} ({dtype_name})"
    # Position 0 attends to itself only: the output is that value row exactly (up to rounding).
    rows0 = v_cache[0, :, 0].double().repeat_interleave(H // Hkv, dim=0)
    assert (got[0].double() - rows0).abs().max().item() < TOLERANCE[dtype]


def test_errors_name_the_argument(device):
    q = torch.randn(2, 4, 16, device=device)
    cache = torch.randn(2, 2, 8, 16, device=device)
    positions = torch.zeros(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="q must be 3-D"):
        decode_attention(q[0], cache, cache, positions)
    with pytest.raises(TypeError, match="v_cache has dtype"):
        decode_attention(q, cache, cache.half(), positions)
    with pytest.raises(ValueError, match="k_cache has shape"):
        decode_attention(q, cache[:1], cache[:1], positions)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.randn(2, 3, 16, device=device), cache, cache, positions)
    with pytest.raises(ValueError, match="positions has 1 entries"):
        decode_attention(q, cache, cache, positions[:1])
    with pytest.raises(TypeError, match="positions has dtype"):
        decode_attention(q, cache, cache, positions.float())
