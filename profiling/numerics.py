"""Numerical tolerance of a fused step (docs/definitions.md, "Numerical tolerance").

Reference: the step's formula in float64 on upcast inputs (engine/program.py runs the span's
ops in float64), keeping only the roundings the kernels' contract states: a normalised input
rounded to the input dtype as transformers does, the residual stream stored in it. Both paths
make those roundings; leaving them out of the reference would add an error common to both
that is larger than an output ulp, and an elementwise comparison of the two paths' errors
would then judge luck. The fused result is held to the unfused path (the span's ops in the same
dtype) element by element: its error may exceed the unfused error at an element by at most

- bf16 / fp16: one ulp of the output dtype at that element;
- fp32: four fp32 ulps, with TF32 off for the unfused path, so that a TF32 or bf16 shortcut
  in the fused path (errors ~1e-3 relative) fails;

ulps are counted at the element's magnitude, but not below 1/16 of the output's rms: where a
sum cancels to near zero, a different rounding of an intermediate (e.g. a normalised input
rounded to bf16 one ulp apart) moves the result by far more ulps of its own tiny size while
staying ~1e-4 of the output's scale. Under Triton's interpreter (CPU) bf16/fp16 stores
truncate where the GPU rounds, so two more ulps are allowed there and the norm-relative bound
is 2e-2 (the truncating unfused path itself exceeds 1e-2 on some steps);

plus the float32 accumulation-order allowance of every dot product in the step: both paths
accumulate in float32 but in different orders, which moves a sum of K terms by about
eps32 * sqrt(K) * sqrt(sum of squared terms); the allowance is 8 times that (a TF32 product
errs ~2**-11 per term, 100x more). On top: norm-relative error < 1e-2 and no NaN/inf where
the reference is finite. The original plan's "max |fused - float64| < 1e-3" is reported for
fp32, not used as the bound (it is ~6000x the error fp32 really has).

The output is poisoned before the fused call (in place: the residual is the buffer; otherwise
NaN-filled memory is handed back to the allocator just before), inputs are fresh per check.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from engine.program import (
    Fusion,
    Op,
    call_fused,
    draw_inputs,
    run_float64,
    run_unfused,
    span_ops,
)
from kernels.runtime import INTERPRETING

SEED_MAX_ABS = 1e-3  # the original plan's fp32 figure: reported, not the bound
ACC_FACTOR = 8
MAGNITUDE_FLOOR = 1 / 16  # of the output's rms
if INTERPRETING:
    NORM_REL_MAX = 2e-2
    ULPS = {torch.bfloat16: 3, torch.float16: 3, torch.float32: 4}
else:
    NORM_REL_MAX = 1e-2
    ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 4}
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
_EPS32 = 2.0**-24  # float32 unit roundoff


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |values| (float64), floored at the smallest normal's."""
    tiny = torch.finfo(dtype).tiny
    magnitude = values.abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - _MANTISSA_BITS[dtype])


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """float32 matmuls in full float32 for the block (the fp32 comparison path)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)


@dataclasses.dataclass
class NumericsResult:
    name: str  # "<fusion>.<output>"
    dtype: str
    rows: int
    max_abs: float
    norm_rel: float
    unfused_max_abs: float
    unfused_norm_rel: float
    worst_excess_ulps: float  # max over elements of (error - allowed) / ulp; <= 0 passes
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def key(self) -> str:
        return f"{self.name}/{self.dtype}/m{self.rows}"

    def summary(self) -> str:
        status = "ok" if self.ok else "FAIL: " + "; ".join(self.failures)
        seed = ""
        if self.dtype == "float32":
            seed = f" (plan's 1e-3: {'met' if self.max_abs < SEED_MAX_ABS else 'missed'})"
        return (
            f"{self.key}: max_abs={self.max_abs:.3g} (unfused {self.unfused_max_abs:.3g}) "
            f"norm_rel={self.norm_rel:.3g} (unfused {self.unfused_norm_rel:.3g}){seed} {status}"
        )

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _norm_rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return (err.norm() / ref.norm().clamp_min(1e-300)).item()


def judge(
    name: str,
    got: torch.Tensor,
    ref64: torch.Tensor,
    unfused: torch.Tensor,
    *,
    rows: int,
    acc_allowance: torch.Tensor | float = 0.0,
) -> NumericsResult:
    """Hold ``got`` (the fused result) to the rule above against ``ref64`` and ``unfused``."""
    dtype = unfused.dtype
    failures: list[str] = []
    if got.shape != ref64.shape or got.dtype != dtype:
        failures.append(f"result is {tuple(got.shape)} {got.dtype}, expected {tuple(ref64.shape)}")
        inf = float("inf")
        return NumericsResult(name, str(dtype), rows, inf, inf, 0, 0, inf, failures)
    finite = torch.isfinite(ref64)
    zero = torch.zeros_like(ref64)
    got64, unfused64 = got.double(), unfused.double()
    bad = finite & ~torch.isfinite(got64)
    if bad.any():
        failures.append(f"{int(bad.sum())} NaN/inf elements where the reference is finite")
    err = (got64 - ref64).where(finite, zero).abs().nan_to_num(nan=float("inf"))
    unfused_err = (unfused64 - ref64).where(finite, zero).abs()
    ref = ref64.where(finite, zero)
    result = NumericsResult(
        name,
        str(dtype).removeprefix("torch."),
        rows,
        err.max().item(),
        _norm_rel(err, ref),
        unfused_err.max().item(),
        _norm_rel(unfused_err, ref),
        0.0,
        failures,
    )
    if bad.any():
        return result
    floor = MAGNITUDE_FLOOR * ref.pow(2).mean().sqrt()
    unit = ulp(torch.maximum(ref.abs(), floor), dtype)
    allowed = unfused_err + ULPS[dtype] * unit + acc_allowance
    excess = ((err - allowed) / unit).where(finite, zero)
    result.worst_excess_ulps = excess.max().item()
    if result.worst_excess_ulps > 0:
        failures.append(
            f"{int((excess > 0).sum())} elements exceed the unfused error + {ULPS[dtype]} ulp "
            f"(worst by {result.worst_excess_ulps:.3g} ulp)"
        )
    if result.norm_rel >= NORM_REL_MAX:
        failures.append(f"norm-relative error {result.norm_rel:.3g} >= {NORM_REL_MAX}")
    return result


MODEL_NORM_REL_FACTOR, MODEL_MAX_ABS_FACTOR = 1.5, 2.0


def judge_model(
    name: str, fused: torch.Tensor, ref64: torch.Tensor, unfused: torch.Tensor, *, rows: int
) -> NumericsResult:
    """The whole engine: fused logits against an fp32 reference, held to the unfused engine's
    error in the same dtype. Each fused step is within an ulp of its unfused ops; through the
    layers those differences travel like the unfused path's own rounding errors, so the fused
    engine's error may be at most 1.5x the unfused engine's norm-relative error and 2x its
    largest element error (elementwise ulps do not survive 28 layers of mixing)."""
    result = judge(name, fused, ref64, unfused, rows=rows)
    result.failures = [f for f in result.failures if "NaN" in f or "result is" in f]
    if result.failures:
        return result
    if result.norm_rel > MODEL_NORM_REL_FACTOR * result.unfused_norm_rel:
        result.failures.append(
            f"norm-relative error {result.norm_rel:.3g} > {MODEL_NORM_REL_FACTOR} x the unfused "
            f"engine's {result.unfused_norm_rel:.3g}"
        )
    if result.max_abs > MODEL_MAX_ABS_FACTOR * result.unfused_max_abs:
        result.failures.append(
            f"max error {result.max_abs:.3g} > {MODEL_MAX_ABS_FACTOR} x the unfused engine's "
            f"{result.unfused_max_abs:.3g}"
        )
    return result


def accumulation_allowance(ops: Sequence[Op], inputs: dict) -> dict[str, torch.Tensor]:
    """Per written slot: the float32 accumulation-order allowance carried to it (float64).

    A dot product of K terms t_k gets ACC_FACTOR * eps32 * sqrt(K * sum t_k**2); ops after
    it pass the allowance on by evaluating them in float64 on their inputs moved by it (both
    ways, the larger change counts).
    """
    state = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    slack: dict[str, torch.Tensor] = {}
    for op in ops:
        args = {r.name: state[r.name] for r in op.reads}
        out = op.fn64(**args)
        if op.accumulates is not None:
            x, w = (args[n] for n in op.accumulates)
            K = x.shape[-1]
            spread = (x * x) @ (w * w).T
            slack[op.writes] = ACC_FACTOR * _EPS32 * torch.sqrt(K * spread)
        else:
            carried = [r.name for r in op.reads if r.name in slack]
            if carried and op.propagate is not None:
                slack[op.writes] = op.propagate(args, {n: slack[n] for n in carried})
            elif carried:
                moved = [
                    op.fn64(**{**args, **{n: args[n] + sign * slack[n] for n in carried}})
                    for sign in (1, -1)
                ]
                slack[op.writes] = torch.maximum(*((m - out).abs() for m in moved))
            else:
                slack.pop(op.writes, None)
        state[op.writes] = out
    return slack


def _clone(inputs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _poison_allocator(tensors: Sequence[torch.Tensor]) -> None:
    """Fill memory of the outputs' sizes with NaN and free it: a fused call that allocates its
    output gets that memory back from the caching allocator, so an unwritten element is NaN."""
    poison = [torch.full_like(t, float("nan")) for t in tensors]
    del poison


def check_fusion(
    fusion: Fusion,
    program,
    config,
    rows: int,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> list[NumericsResult]:
    """The rule above for every output of ``fusion`` at the model's shapes, ``rows`` tokens,
    through the fused callable exactly as the engine's segment calls it."""
    ops = span_ops(program, fusion)
    inputs = draw_inputs(ops, config, rows, dtype, device, generator)
    ref = run_float64(ops, inputs, dtype)
    with tf32_off():
        unfused = run_unfused(ops, _clone(inputs))
    allowance = accumulation_allowance(ops, inputs)
    # In-place outputs (the residual) overwrite their input: the fused call gets copies.
    _poison_allocator([unfused[name] for name in fusion.outputs])
    fused = call_fused(fusion, ops, _clone(inputs))
    return [
        judge(
            f"{fusion.name}.{name}",
            fused[name],
            ref[name],
            unfused[name],
            rows=rows,
            acc_allowance=allowance.get(name, 0.0),
        )
        for name in fusion.outputs
    ]
