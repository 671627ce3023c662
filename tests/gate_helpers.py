"""Synthetic runs of the gate's stages for the gate and report tests: the structure
profiling/measure.py writes, with the model, fusions and program of a real small engine, and
launch counts, ratios and rates made up from parameters (never measured)."""

from __future__ import annotations

import random

import torch
from engine_helpers import small_config

import engine
from profiling import measure, throughput
from profiling.kernel_timing import step_op_names

H100 = ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3")
H200 = ("NVIDIA H200", "nvidia-h200")
LAYERS = 4
PLAN = measure.Plan(batches=(1, 8), kernel_rows=(1, 8), rounds=7)


def small_model(layers: int = LAYERS):
    return engine.build(small_config(num_hidden_layers=layers), dtype=torch.float32, device="cpu")


def _launches(model, extra: dict[str, int]) -> dict:
    """Counts a correct engine would show: every segment one kernel per instance (plus
    ``extra[name]`` per instance), per counted variant, mode and batch."""
    variants = {v.name: v for v in measure.launch_variants()}
    out = {}
    for name, graph, batch in measure.launch_keys(PLAN):
        model.flags = variants[name].flags()
        segments: dict[str, dict] = {}
        for seg in model.segments():
            entry = segments.setdefault(seg.name, {"instances": 0, "per_instance": 0.0})
            entry["instances"] += 1
            entry["per_instance"] = 1.0 + extra.get(seg.name, 0)
        total = sum(s["instances"] * s["per_instance"] for s in segments.values()) + 1
        out[measure.launch_key(name, graph, batch)] = {
            "variant": name,
            "fusions": sorted(variants[name].fusions),
            "mode": "graph" if graph else "eager",
            "batch": batch,
            "kernels_per_step": total,
            "memcpy_per_step": 1.0 if graph else 0.0,
            "memset_per_step": 0.0,
            "uniform": True,
            "segments": segments,
        }
    model.flags = engine.FusionFlags.default()
    return out


def _noisy(center: float, noise: float, rng: random.Random, n: int) -> list[float]:
    return [center * (1 + rng.uniform(-noise, noise)) for _ in range(n)]


def synthetic_report(
    *,
    seed: int,
    model=None,
    gpu=H100,
    ratio_scale: float | dict[str, float] = 1.0,
    default_tok_s: float = 1000.0,
    gain: dict[str, float] | None = None,
    noise: float = 0.002,
    extra_kernels: dict[str, int] | None = None,
    plan: measure.Plan = PLAN,
    op_ratios: bool = True,
) -> dict:
    """A run of the gate's stages. ``ratio_scale``: multiplies every kernel ratio (or per
    fusion or op name); ``gain``: per pairing name its speed-up - 1 (default 0.1 each, 0.5 for
    all); ``extra_kernels``: per segment name, kernels added per instance; ``op_ratios``: the
    ratios of the ops the default step runs alone (against a copy) are in the run."""
    rng = random.Random(seed)
    model = model or small_model()
    report = measure.report_header(model, plan)
    report.update(gpu=gpu[0], gpu_slug=gpu[1], interpreted=False, cuda="13.0", backend="compiled")
    report["launches"] = _launches(model, extra_kernels or {})
    report["numerics"] = []
    ratios = {}
    refs = {
        f: ["unfused"] + (["addmm_"] if f.endswith("_residual") and "proj" in f else [])
        for f in report["model"]["fusions"]
    }
    if op_ratios:
        refs.update({op: ["copy"] for op in step_op_names(model)})
    for name, references in refs.items():
        scale = ratio_scale.get(name, 1.0) if isinstance(ratio_scale, dict) else ratio_scale
        for rows in plan.kernel_rows:
            for ref in references:
                rounds = _noisy(0.5 * scale, noise, rng, plan.kernel_rounds)
                ratios[measure.ratio_key(name, rows, ref)] = {
                    "ratio": sorted(rounds)[len(rounds) // 2],
                    "rounds": rounds,
                    "fused_us": 3.0 * scale,
                    "reference_us": 6.0,
                }
    report["kernel_ratios"] = ratios
    variants, pairings = throughput.variants_and_pairings()
    gains = {p.name: 0.5 if p.name == "all" else 0.1 for p in pairings}
    gains.update(gain or {})
    e2e = {}
    for batch in plan.batches:
        rates = {v.name: _noisy(default_tok_s * batch, noise, rng, plan.rounds) for v in variants}
        for p in pairings:
            jitter = _noisy(1.0, noise, rng, plan.rounds)  # paired rounds differ a little
            g = 1 + gains[p.name]
            if p.on == "default":
                rates[p.off] = [r / g * j for r, j in zip(rates["default"], jitter, strict=True)]
            else:
                rates[p.on] = [r * g * j for r, j in zip(rates[p.off], jitter, strict=True)]
        e2e[f"b{batch}"] = {
            "batch": batch,
            "variants": {
                n: {"tok_s": r, "median": sorted(r)[len(r) // 2], "spread": throughput.spread(r)}
                for n, r in rates.items()
            },
            "speedups": throughput.speedups(rates, pairings),
        }
    report["e2e"] = e2e
    return report
