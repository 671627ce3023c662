"""kernels.runtime.launch: the host-side fast path that hands arguments straight to the
compiled kernel must launch the same binary Triton's own path would (same results), and a
change in what Triton specializes on (pointer alignment, integer values) must not reuse a
binary compiled for something else."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.jit import JITFunction

import kernels.runtime as runtime
from kernels.fused_attn_output import fused_attn_output_residual
from kernels.rms_norm import rms_norm, rms_norm_reference
from profiling.numerics import check_fused_numerics, draw_inputs


def test_arg_key_tells_apart_what_triton_specializes_on():
    base = torch.randn(64)
    aligned, misaligned = base[:32], base[1:33]  # float32: the second starts 4 bytes later
    assert runtime._arg_key(aligned) != runtime._arg_key(misaligned)
    assert runtime._arg_key(aligned) != runtime._arg_key(aligned.to(torch.bfloat16))
    assert runtime._arg_key(16) != runtime._arg_key(17)
    assert runtime._arg_key(1) != runtime._arg_key(2)
    assert runtime._arg_key(0.5) == runtime._arg_key(2.0)  # fp32 scalars are not specialized
    with pytest.raises(TypeError):
        runtime._arg_key(object())


def test_no_launch_hooks_by_default():
    """Otherwise every launch would take Triton's own path (an empty HookChain is no hook)."""
    assert not runtime._launch_hooks_set()


@pytest.mark.gpu
def test_fast_path_is_taken_and_matches_triton_path(monkeypatch):
    if not runtime.FAST_LAUNCH:
        pytest.skip("FUSIONGUARD_TRITON_LAUNCH=jit: every launch takes Triton's own path")
    x, r, w = draw_inputs(1, 1024, 2048, torch.bfloat16, "cuda")
    first = fused_attn_output_residual(x, r, w)  # Triton's path (or an earlier test's)
    jit_runs = []
    jit_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda *a, **k: jit_runs.append(1) or jit_run(*a, **k))
    for _ in range(3):  # the fast path: Triton's run() is not entered, bitwise the same result
        assert torch.equal(fused_attn_output_residual(x, r, w), first)
    assert not jit_runs
    monkeypatch.setattr(runtime, "FAST_LAUNCH", False)
    assert torch.equal(fused_attn_output_residual(x, r, w), first)
    assert jit_runs  # and the switch does send it through Triton's path


def _shifted_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` whose data starts ``offset`` elements past a 16-byte boundary."""
    storage = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    return storage[offset : offset + t.numel()].view(t.shape).copy_(t)


def _through_fast_path(in_place: bool, x_offset: int, r_offset: int):
    """The fused call with out=None or out=residual (the keyed fast path), on copies of
    attn_output and residual shifted by the given element offsets."""

    def fused(x, r, w, rw=1.0, *, out):
        x, r = _shifted_copy(x, x_offset), _shifted_copy(r, r_offset)
        return out.copy_(fused_attn_output_residual(x, r, w, rw, out=r if in_place else None))

    return fused


@pytest.mark.gpu
@pytest.mark.parametrize("in_place", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("M", [1, 16, 512])
def test_alignment_changes_between_calls_of_one_signature(M, in_place):
    """Same shapes and strides call after call, but attn_output and residual start at or 2
    bytes past a 16-byte boundary in turn: a binary compiled for aligned pointers must never
    run on misaligned ones (D2 on every result)."""
    for x_offset, r_offset in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 0)]:
        x, r, w = draw_inputs(M, 1024, 2048, torch.bfloat16, "cuda")
        fused = _through_fast_path(in_place, x_offset, r_offset)
        result = check_fused_numerics(fused, x, r, w)
        assert result.ok, f"offsets x {x_offset} r {r_offset}: {result.summary()}"


@pytest.mark.gpu
def test_small_op_through_fast_path_on_fresh_inputs():
    w = torch.randn(1024, device="cuda").to(torch.bfloat16)
    for rows in (1, 1, 3, 1):  # repeats go through the fast path, a new row count does not
        x = torch.randn(rows, 1024, device="cuda").to(torch.bfloat16)
        out = torch.full_like(x, float("nan"))
        rms_norm(x, w, 1e-6, out=out)
        torch.testing.assert_close(out, rms_norm_reference(x, w, 1e-6), atol=0, rtol=1e-2)
