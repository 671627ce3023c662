"""Running the gate on this machine: measure as the baseline did, check numerics, compare.

profiling/baselines.py holds the files and the pure comparison; this module does the
measuring: the same model config, settings and modes as the stored baseline, plus the D2
numerics check of the o_proj+residual step exactly as the engine calls it (through the module
global ``engine.qwen3.o_proj_residual``, so a patched step is what gets checked).
"""

from __future__ import annotations

import torch

from profiling.baselines import GateResult, compare, load_baseline
from profiling.numerics import NumericsResult, check_fused_numerics, draw_inputs
from profiling.throughput import Mode, Settings, measure_all, report_json

NUMERICS_ROWS = (1, 16)  # a decode row, and a prefill-sized block


def default_model(config=None, *, device=None, dtype=torch.bfloat16):
    """The gate's and report's model: the embedded Qwen3-0.6B default, random seeded weights."""
    import engine
    from engine.config import default_config

    return engine.build(config or default_config(), dtype=dtype, device=device, seed=0)


def engine_numerics(model, rows=NUMERICS_ROWS, *, seed: int = 0) -> list[NumericsResult]:
    """D2 check of the engine's fused o_proj+residual step at the model's shapes and dtype."""
    from engine import qwen3

    def fused_step(attn_output, residual, o_proj_weight, residual_weight=1.0, *, out):
        if residual_weight != 1.0:
            raise ValueError("the engine's step has residual_weight 1.0 only")
        # Looked up at call time: a monkeypatched engine.qwen3.o_proj_residual is checked.
        # The engine's fused step writes the residual in place: hand it a copy.
        out.copy_(qwen3.o_proj_residual(attn_output, residual.clone(), o_proj_weight, True))
        return out

    c = model.config
    N, K = c.hidden_size, c.num_attention_heads * c.head_dim
    generator = torch.Generator(device=model.device).manual_seed(seed)
    results = []
    for M in rows:
        x, r, w = draw_inputs(M, N, K, model.dtype, model.device, generator)
        results.append(check_fused_numerics(fused_step, x, r, w))
    return results


def baseline_modes(baseline: dict) -> list[Mode]:
    return [
        Mode(fused, entry["cuda_graph"], entry["batch"])
        for entry in baseline["modes"].values()
        for fused in (True, False)
    ]


def baseline_settings(baseline: dict, repeats: int | None = None) -> Settings:
    stored = dict(baseline["settings"])
    if repeats is not None:
        stored["repeats"] = repeats
    return Settings(**stored)


def run_gate(
    model, baseline: dict | None = None, *, repeats: int | None = None, progress=None
) -> tuple[GateResult, dict]:
    """Measure ``model`` as ``baseline`` (default: this GPU's stored one) was measured and
    compare. Returns the result and the current report. Raises BaselineError without a
    usable baseline."""
    baseline = load_baseline() if baseline is None else baseline
    settings = baseline_settings(baseline, repeats)
    results = measure_all(model, baseline_modes(baseline), settings, progress=progress)
    current = report_json(results, model, settings)
    return compare(current, baseline, numerics=engine_numerics(model)), current
