"""Bad input to linear_residual (and to its attention-block name fused_attn_output_residual):
a clear error naming the argument, or a defined, tested result."""

from __future__ import annotations

import pytest
import torch
from test_linear_residual_numerics import check, draw

from conftest import HAS_GPU
from kernels.fused_attn_output import fused_attn_output_residual
from kernels.linear_residual import linear_residual, linear_residual_float64


def _inputs(device, M=3, N=96, K=160, dtype=torch.float32):
    return draw(M, N, K, dtype, device)


def test_mismatched_k(device):
    _x, r, w = _inputs(device)
    with pytest.raises(
        ValueError, match=r"^x has shape \(3, 161\) but weight is \[N=96, K=160\]: expected x\["
    ):
        linear_residual(torch.randn(3, 161, device=device), r, w)


def test_mismatched_n(device):
    x, r, w = _inputs(device)
    with pytest.raises(ValueError, match=r"^residual has shape \(3, 96\); expected \(3, 95\)"):
        linear_residual(x, r, w[:95])


def test_residual_wrong_leading_shape(device):
    x, r, w = _inputs(device)
    with pytest.raises(ValueError, match=r"^residual has shape \(2, 96\); expected \(3, 96\)"):
        linear_residual(x, r[:2], w)


def test_weight_not_2d(device):
    x, r, w = _inputs(device)
    with pytest.raises(ValueError, match=r"^weight must be 2-D \[N, K\]"):
        linear_residual(x, r, w[None])


def test_zero_k_rejected(device):
    with pytest.raises(ValueError, match="^weight has K=0"):
        linear_residual(
            torch.randn(3, 0, device=device),
            torch.randn(3, 8, device=device),
            torch.randn(8, 0, device=device),
        )


@pytest.mark.parametrize("bad", ["residual", "weight", "out"])
def test_mixed_dtypes(bad, device):
    x, r, w = _inputs(device)
    args = {"x": x, "residual": r, "weight": w, "out": torch.empty_like(r)}
    args[bad] = args[bad].to(torch.bfloat16)
    with pytest.raises(TypeError, match=f"^{bad} has dtype torch.bfloat16 but x has torch.float32"):
        linear_residual(**args)


def test_unsupported_dtype(device):
    x, r, w = (t.double() for t in _inputs(device))
    with pytest.raises(TypeError, match="^x has dtype torch.float64; supported"):
        linear_residual(x, r, w)


@pytest.mark.parametrize("bad", ["x", "residual", "weight", "out"])
def test_not_a_tensor(bad, device):
    x, r, w = _inputs(device)
    args = {"x": x, "residual": r, "weight": w, "out": torch.empty_like(r)}
    args[bad] = args[bad].tolist()
    with pytest.raises(TypeError, match=f"^{bad} must be a torch.Tensor, got list"):
        linear_residual(**args)


@pytest.mark.parametrize("bad", [torch.tensor(1.0), "1.0", True])
def test_residual_weight_type(bad, device):
    x, r, w = _inputs(device)
    with pytest.raises(TypeError, match="residual_weight must be a real number"):
        linear_residual(x, r, w, bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_residual_weight_not_finite(bad, device):
    x, r, w = _inputs(device)
    with pytest.raises(ValueError, match="residual_weight must be finite"):
        linear_residual(x, r, w, bad)


@pytest.mark.gpu
@pytest.mark.parametrize("on_cpu", ["x", "residual", "weight", "out"])
def test_cpu_tensor_beside_cuda(on_cpu):
    x, r, w = _inputs("cuda")
    args = {"x": x, "residual": r, "weight": w, "out": torch.empty_like(r)}
    args[on_cpu] = args[on_cpu].cpu()
    # With x itself on the CPU, the first tensor that differs from it is named.
    expected = "^residual is on cuda" if on_cpu == "x" else f"^{on_cpu} is on cpu but x is on cuda"
    with pytest.raises(ValueError, match=expected):
        linear_residual(**args)


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-without-interpreter message; GPU runs compile")
def test_cpu_tensors_need_interpreter(monkeypatch):
    import kernels.linear_residual as mod

    monkeypatch.setattr(mod, "INTERPRETING", False)
    x, r, w = _inputs("cpu")
    with pytest.raises(ValueError, match="^x is on cpu: compiled kernels need CUDA tensors"):
        linear_residual(x, r, w)
    with pytest.raises(ValueError, match="^attn_output is on cpu: compiled kernels need CUDA"):
        fused_attn_output_residual(x, r, w)


def test_empty_batch_returns_empty(device):
    """M=0 is a defined result: an empty [..., N] tensor, no launch."""
    x, r, w = _inputs(device, M=0)
    result = linear_residual(x, r, w)
    assert result.shape == (0, 96) and result.dtype == x.dtype
    result3 = linear_residual(x.view(2, 0, 160), r.view(2, 0, 96), w)
    assert result3.shape == (2, 0, 96)


def test_non_contiguous_inputs_are_handled(device):
    """Column-major weight, strided activations, expanded residual: any input strides work."""
    M, N, K = 5, 96, 160
    x_wide, _r, _w = _inputs(device, M=M, N=N, K=2 * K)
    x = x_wide[:, ::2]  # stride 2 along K
    w = torch.randn(K, N, device=device).mul_(0.02).T  # [N, K], column-major
    r_row = torch.randn(1, N, device=device).expand(M, N)  # stride 0 rows
    assert not x.is_contiguous() and not w.is_contiguous() and r_row.stride(0) == 0
    result = check(linear_residual, x, r_row, w)
    assert result.ok, result.summary()


def test_out_that_cannot_be_viewed_is_rejected(device):
    x, r, w = _inputs(device, M=6)
    out = torch.empty(3, 2, 192, device=device)[:, :, ::2]  # [3, 2, 96], strided rows
    out = out.transpose(0, 1)  # [2, 3, 96] whose leading dims cannot be flattened
    with pytest.raises(ValueError, match=r"^out with shape .* cannot be viewed as \[rows, 96\]"):
        linear_residual(x.view(2, 3, 160), r.view(2, 3, 96), w, out=out)


def test_out_aliasing_rejected(device):
    x, r, w = _inputs(device, M=4, N=160, K=160)
    with pytest.raises(ValueError, match="^out overlaps x: only out=residual may alias"):
        linear_residual(x, r, w, out=x)
    with pytest.raises(ValueError, match="^out overlaps weight"):
        linear_residual(x, r, w, out=w[:4])
    with pytest.raises(ValueError, match="^out partially overlaps residual"):
        big = torch.randn(5, 160, device=device)
        linear_residual(x, big[:4], w, out=big[1:])
    with pytest.raises(ValueError, match="^out has a zero stride"):
        linear_residual(x, r, w, out=torch.empty(1, 160, device=device).expand(4, 160))


def test_out_wrong_shape(device):
    x, r, w = _inputs(device)
    with pytest.raises(ValueError, match=r"^out has shape \(3, 95\); expected \(3, 96\)"):
        linear_residual(x, r, w, out=torch.empty(3, 95, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_propagate_like_the_formula(dtype, device):
    """NaN/inf in inputs is a defined result: exactly where the float64 formula has them."""
    x, r, w = _inputs(device, M=4, dtype=dtype)
    x[1, 7] = float("nan")
    r[2, 5] = float("inf")
    w[9, 3] = float("-inf")
    got = linear_residual(x, r, w)
    ref = linear_residual_float64(x, r, w)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(torch.signbit(got[torch.isinf(got)]), torch.signbit(ref[torch.isinf(ref)]))
    finite = torch.isfinite(ref)
    assert torch.isnan(ref).any() and finite.any()
    assert torch.allclose(got.double()[finite], ref[finite], atol=0.05, rtol=0.02)


# Through the attention block's name: the errors name its arguments.


def test_attn_output_names_in_shape_errors(device):
    x, r, w = _inputs(device)
    with pytest.raises(
        ValueError,
        match=r"^attn_output has shape \(3, 161\) but o_proj_weight is \[N=96, K=160\]: "
        r"expected attn_output\[\.\.\., 160\]",
    ):
        fused_attn_output_residual(torch.randn(3, 161, device=device), r, w)
    with pytest.raises(ValueError, match=r"^o_proj_weight must be 2-D"):
        fused_attn_output_residual(x, r, w[None])
    with pytest.raises(
        ValueError, match=r"^residual has shape \(3, 96\); expected \(3, 95\) \(attn_output's"
    ):
        fused_attn_output_residual(x, r, w[:95])


@pytest.mark.parametrize("bad", ["residual", "o_proj_weight"])
def test_attn_output_names_in_dtype_errors(bad, device):
    x, r, w = _inputs(device)
    args = {"attn_output": x, "residual": r, "o_proj_weight": w}
    args[bad] = args[bad].half()
    with pytest.raises(TypeError, match=f"^{bad} has dtype torch.float16 but attn_output has"):
        fused_attn_output_residual(**args)


def test_attn_output_names_in_aliasing_errors(device):
    x, r, w = _inputs(device, M=4, N=160, K=160)
    with pytest.raises(ValueError, match="^out overlaps attn_output"):
        fused_attn_output_residual(x, r, w, out=x)
    with pytest.raises(ValueError, match="^out overlaps o_proj_weight"):
        fused_attn_output_residual(x, r, w, out=w[:4])


def test_in_place_overlap_is_refused_on_every_call(device):
    """In place (out=residual), attn_output must not overlap the residual it overwrites: every
    call checks it, also after a good in-place call of the same shapes and again after a refusal;
    a refused call writes nothing."""
    x, r, w = _inputs(device, M=2, N=96, K=96)
    expected = linear_residual_float64(x, r, w)
    fused_attn_output_residual(x, r, w, out=r)  # a good in-place call of the same signature
    assert torch.allclose(r.double(), expected, atol=1e-4, rtol=1e-4)
    shared = torch.randn(2 * 96 + 48, device=device, dtype=x.dtype)
    x_over, r_over = shared[: 2 * 96].view(2, 96), shared[48:].view(2, 96)
    before = shared.clone()
    for _ in range(2):
        with pytest.raises(ValueError, match="^out overlaps attn_output"):
            fused_attn_output_residual(x_over, r_over, w, out=r_over)
        assert torch.equal(shared, before)
