"""Synthetic throughput reports for the gate and report tests: the shape profiling/throughput.py
writes, with launch counts and noisy repeats made up from parameters (never measured)."""

from __future__ import annotations

import random
import types

import torch

from profiling.launches import O_PROJ_RANGE, LaunchCounts, StepCounts
from profiling.throughput import Mode, Settings, ThroughputResult, report_json

H100 = ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3")
H200 = ("NVIDIA H200", "nvidia-h200")
LAYERS = 4
OTHER_PER_LAYER = 8


def _counts(fused: bool, extra_per_layer: int = 0) -> LaunchCounts:
    per_layer = (1 if fused else 2) + extra_per_layer
    step = StepCounts(
        kernels=LAYERS * (OTHER_PER_LAYER + per_layer) + 2,
        memcpy=2,
        memset=0,
        ranges={O_PROJ_RANGE: [per_layer] * LAYERS},
    )
    return LaunchCounts("eager", [step] * 3, {})


def _rates(center: float, noise: float, rng: random.Random, n: int = 10) -> list[float]:
    return [center * (1 + rng.uniform(-noise, noise)) for _ in range(n)]


def synthetic_report(
    *,
    seed: int,
    gpu=H100,
    fused_tok_s: float = 1000.0,
    unfused_tok_s: float = 900.0,
    noise: float = 0.01,
    fused_extra_per_layer: int = 0,
    layers: int = LAYERS,
    prompt_len: int = 16,
    modes=("eager", "graph"),
) -> dict:
    rng = random.Random(seed)
    results = []
    for graph in (False, True):
        if ("graph" if graph else "eager") not in modes:
            continue
        scale = 1.5 if graph else 1.0
        results.append(
            ThroughputResult(
                Mode(True, graph),
                _rates(fused_tok_s * scale, noise, rng),
                _counts(True, fused_extra_per_layer),
            )
        )
        results.append(
            ThroughputResult(
                Mode(False, graph), _rates(unfused_tok_s * scale, noise, rng), _counts(False)
            )
        )
    model = types.SimpleNamespace(
        dtype=torch.bfloat16,
        config=types.SimpleNamespace(num_hidden_layers=layers, hidden_size=1024, vocab_size=99),
    )
    report = report_json(results, model, Settings(prompt_len=prompt_len, repeats=10))
    report.update(gpu=gpu[0], gpu_slug=gpu[1], interpreted=False, cuda="13.0")
    return report
