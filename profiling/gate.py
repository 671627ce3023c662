"""The gate: measure what this GPU's baseline measured, compare, decide.

Stages, for every registered fusion (profiling/measure.py): the engine's default fusions;
exact launch counts; numerics through the engine's fused callables and of the whole engine;
kernel time ratios at decode sizes; end-to-end decode (default tok/s, speed-ups) with the
variants interleaved. The comparison is profiling/baselines.py's. A failing timing check
(kernel ratio, tok/s, speed-up) is measured once more before the gate fails: the second
measurement decides, and both are printed.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from profiling import baselines, measure
from profiling.baselines import Check, GateResult
from profiling.ranks import Ranks


def default_model(config=None, *, device=None, dtype=torch.bfloat16):
    """The gate's and report's model: the embedded Qwen3-0.6B default, random seeded weights,
    the engine's default fusions."""
    import engine
    from engine.config import default_config

    return engine.build(config or default_config(), dtype=dtype, device=device, seed=0)


def measure_gate_stages(
    model, plan: measure.Plan, *, seed: int, log=print, ranks: Ranks | None = None
) -> dict:
    """One run of the gate's stages: the report data the comparison reads.

    Without a GPU only numerics run (launch counts, kernel timing and CUDA-graph decode need
    one), as in the CPU report. Under tensor parallelism every rank calls this in lockstep and
    gets rank 0's run back, with every rank's launch data under ``tp`` (measure.tp_summary):
    every rank then compares the same figures and re-measures the same checks."""
    ranks = ranks or Ranks.single()
    current = measure.report_header(model, plan)
    on_gpu = model.device.type == "cuda"

    def numerics():
        return [r.to_json() for r in measure.measure_numerics(model, plan, seed, ranks.share)]

    stages = (
        ("launches", lambda: measure.measure_launches(model, plan), on_gpu),
        ("numerics", numerics, True),
        ("kernel_ratios", lambda: measure.measure_kernel_ratios(model, plan), on_gpu),
        ("e2e", lambda: measure.measure_e2e(model, plan), on_gpu),
    )
    for name, run, runs_here in stages:
        if not runs_here:
            current[f"{name}_note"] = f"not measured: {name} needs a CUDA GPU"
            continue
        ranks.barrier()  # each stage starts together: no rank's timing includes a peer's wait
        started = time.perf_counter()
        current[name] = run()
        log(f"  {name}: {time.perf_counter() - started:.1f} s")
    if ranks.sharded:
        current["tp"] = measure.tp_summary(model, current, ranks)
    return ranks.share(current)


def _retry(
    model, plan, current: dict, baseline: dict, result: GateResult, log, ranks: Ranks
) -> GateResult:
    """Measure the failing timing checks once more; the second measurement decides."""
    failing = [c for c in result.failures if c.timing]
    if not failing:
        return result
    log(f"  re-measuring {len(failing)} failing timing check(s) once:")
    again = dict(current)
    ratio_keys = {c.key for c in failing if c.stage == "kernel_ratio"}
    if ratio_keys:
        again["kernel_ratios"] = {
            **current["kernel_ratios"],
            **measure.measure_kernel_ratios(model, plan, only=ratio_keys),
        }
    batches = sorted({int(c.key.split(".")[0][1:]) for c in failing if c.stage != "kernel_ratio"})
    if batches:
        again["e2e"] = {**current["e2e"], **measure.measure_e2e(model, plan, batches=batches)}
    again = ranks.share(again)  # rank 0's figures decide on every rank
    second = baselines.compare(again, baseline)
    by_key = {(c.stage, c.key): c for c in second.checks}
    checks = []
    for c in result.checks:
        if c in failing:
            c2 = by_key.get((c.stage, c.key), c)
            message = f"first {c.message}; again {c2.message}"
            checks.append(dataclasses.replace(c2, message=message))
            log(f"    {c.stage} {c.key}: {'PASS' if c2.ok else 'FAIL'} on the second measurement")
        else:
            checks.append(c)
    current["remeasured"] = {"kernel_ratios": again["kernel_ratios"], "e2e": again["e2e"]}
    return GateResult(checks, result.notes + [n for n in second.notes if n not in result.notes])


def run_gate(
    model, baseline: dict, *, seed: int = 0, log=print, ranks: Ranks | None = None
) -> tuple[GateResult, dict]:
    """Measure ``model`` with ``baseline``'s plan, compare, re-measure failing timing once.

    Raises BaselineError when the baseline cannot be compared with this model (before
    measuring anything).
    """
    plan = measure.Plan.from_json(baseline["plan"])
    baselines.check_comparable(measure.report_header(model, plan), baseline)
    ranks = ranks or Ranks.single()
    current = measure_gate_stages(model, plan, seed=seed, log=log, ranks=ranks)
    result = baselines.compare(current, baseline)
    result = _retry(model, plan, current, baseline, result, log, ranks)
    return result, current


__all__ = ["Check", "GateResult", "default_model", "measure_gate_stages", "run_gate"]
