"""Numerical tolerance of a fused o_proj+residual implementation (DESIGN.md D2).

Reference: the formula in float64 on upcast inputs. For fp32 the bound is absolute
(max |out - ref| < 1e-3). For bf16/fp16 the fused result is held to the unfused torch path
(F.linear then add, same dtype) element by element: its error may exceed the unfused error at
an element by at most one ulp of the output dtype at that element's magnitude, plus the
float32 accumulation bound K * eps32 * sum|x*w| (both paths accumulate in fp32, in different
orders). One ulp covers round-to-nearest vs. the interpreter's truncating stores. On top:
norm-relative error < 1e-2, and no NaN/inf where the reference is finite.

Both the kernel tests and the gate's planted "numerics off by 1e-2" regression use
``check_fused_numerics``; it must fail for a result perturbed by 1e-2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kernels.fused_attn_output import attn_output_residual_float64, unfused_attn_output_residual

FP32_MAX_ABS = 1e-3
NORM_REL_MAX = 1e-2
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_EPS32 = 2.0**-24  # float32 unit roundoff


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |values| (float64), floored at the smallest normal's."""
    tiny = torch.finfo(dtype).tiny
    magnitude = values.abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - _MANTISSA_BITS[dtype])


def draw_inputs(
    M: int | tuple[int, ...],
    N: int,
    K: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Qwen-like inputs: activations ~N(0, 1), weights ~N(0, 0.02). Never zeros."""
    lead = (M,) if isinstance(M, int) else tuple(M)
    kw = {"device": device, "generator": generator}
    x = torch.randn(*lead, K, **kw).to(dtype)
    r = torch.randn(*lead, N, **kw).to(dtype)
    w = (0.02 * torch.randn(N, K, **kw)).to(dtype)
    return x, r, w


@dataclasses.dataclass
class NumericsResult:
    dtype: str
    max_abs: float
    norm_rel: float
    unfused_max_abs: float
    unfused_norm_rel: float
    worst_excess_ulps: float  # max over elements of (fused_err - allowed) / ulp; <= 0 passes
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        status = "ok" if self.ok else "FAIL: " + "; ".join(self.failures)
        return (
            f"{self.dtype}: max_abs={self.max_abs:.3g} (unfused {self.unfused_max_abs:.3g}) "
            f"norm_rel={self.norm_rel:.3g} (unfused {self.unfused_norm_rel:.3g}) {status}"
        )


def _norm_rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return (err.norm() / ref.norm().clamp_min(1e-300)).item()


def check_fused_numerics(
    fused_fn: Callable[..., torch.Tensor],
    attn_output: torch.Tensor,
    residual: torch.Tensor,
    o_proj_weight: torch.Tensor,
    residual_weight: float = 1.0,
    *,
    in_place: bool = False,
) -> NumericsResult:
    """Run ``fused_fn`` into a NaN-poisoned output buffer and judge it against float64.

    ``fused_fn(attn_output, residual, o_proj_weight, residual_weight, out=buffer)``; with
    ``in_place`` the buffer is a copy of ``residual`` passed as both residual and out (the
    poison then cannot be used: the residual values are the input).
    """
    dtype = attn_output.dtype
    ref = attn_output_residual_float64(attn_output, residual, o_proj_weight, residual_weight)
    unfused = unfused_attn_output_residual(attn_output, residual, o_proj_weight, residual_weight)
    if in_place:
        buffer = residual.clone()
        got = fused_fn(attn_output, buffer, o_proj_weight, residual_weight, out=buffer)
    else:
        buffer = torch.full_like(residual, float("nan"))
        got = fused_fn(attn_output, residual, o_proj_weight, residual_weight, out=buffer)
    failures = []
    if got is not buffer and got.data_ptr() != buffer.data_ptr():
        failures.append("result is not the out buffer")
    if got.shape != ref.shape or got.dtype != dtype:
        failures.append(f"result is {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)}")
        return NumericsResult(str(dtype), float("inf"), float("inf"), 0, 0, float("inf"), failures)

    got64, unfused64 = got.double(), unfused.double()
    finite_ref = torch.isfinite(ref)
    bad = finite_ref & ~torch.isfinite(got64)
    if bad.any():
        failures.append(f"{int(bad.sum())} NaN/inf elements where the reference is finite")
    err = (got64 - ref).where(finite_ref, torch.zeros_like(ref)).abs()
    unfused_err = (unfused64 - ref).where(finite_ref, torch.zeros_like(ref)).abs()
    ref_f = ref.where(finite_ref, torch.zeros_like(ref))
    result = NumericsResult(
        dtype=str(dtype).removeprefix("torch."),
        max_abs=err.max().item() if not bad.any() else float("nan"),
        norm_rel=_norm_rel(err, ref_f) if not bad.any() else float("nan"),
        unfused_max_abs=unfused_err.max().item(),
        unfused_norm_rel=_norm_rel(unfused_err, ref_f),
        worst_excess_ulps=0.0,
        failures=failures,
    )
    if bad.any():
        return result
    if dtype == torch.float32:
        if result.max_abs >= FP32_MAX_ABS:
            failures.append(f"fp32 max_abs {result.max_abs:.3g} >= {FP32_MAX_ABS}")
    else:
        K = attn_output.shape[-1]
        abs_sum = attn_output.double().abs() @ o_proj_weight.double().abs().T
        abs_sum = abs_sum + abs(residual_weight) * residual.double().abs()
        unit = ulp(ref_f, dtype)
        allowed = unfused_err + unit + K * _EPS32 * abs_sum
        excess = ((err - allowed) / unit).where(finite_ref, torch.zeros_like(ref))
        result.worst_excess_ulps = excess.max().item()
        if result.worst_excess_ulps > 0:
            n_bad = int((excess > 0).sum())
            failures.append(
                f"{n_bad} elements exceed the unfused error + 1 ulp "
                f"(worst by {result.worst_excess_ulps:.2f} ulp)"
            )
    if result.norm_rel >= NORM_REL_MAX:
        failures.append(f"norm-relative error {result.norm_rel:.3g} >= {NORM_REL_MAX}")
    return result
