"""Decode throughput: which variants and pairings the suite measures, the interleaved
measurement (CPU: eager through the interpreter, meaningless as figures but the same code),
and the GPU: CUDA-graph decode faster with the default fusions than with none."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import small_config

import engine
from engine import fusions as registry
from profiling import baselines, throughput
from profiling.throughput import Settings, measure_variants, speedups, variants_and_pairings


def test_variants_cover_every_fusion_where_it_runs():
    variants, pairings = variants_and_pairings()
    by_name = {v.name: v for v in variants}
    default = frozenset(f.name for f in registry.all_fusions() if f.default)
    assert by_name["default"].fusions == default and by_name["none"].fusions == frozenset()
    assert {p.name for p in pairings} == {"all", *(f.name for f in registry.all_fusions())}
    for p in pairings:
        on, off = by_name[p.on].fusions, by_name[p.off].fusions
        if p.name == "all":
            continue
        assert on - off == {p.name}, p  # the pair differs by exactly the fusion
        engine.FusionFlags(on)  # a valid combination (no alternatives together)


def test_settings_refuse_too_few_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 5"):
        Settings(rounds=3)
    with pytest.raises(ValueError, match="warmup"):
        Settings(warmup=0)


def test_interleaved_measurement_runs_every_variant_and_restores_the_flags(device):
    model = engine.build(small_config(num_hidden_layers=2), dtype=torch.float32, device=device)
    before = model.flags
    variants, pairings = variants_and_pairings()
    chosen = [v for v in variants if v.name in ("default", "none")]
    rates = measure_variants(
        model, chosen, 1, Settings(prompt_len=3, new_tokens=2, rounds=5), cuda_graph=False
    )
    assert set(rates) == {"default", "none"}
    assert all(len(r) == 5 and all(x > 0 for x in r) for r in rates.values())
    assert model.flags is before
    result = speedups(rates, [p for p in pairings if p.name == "all"])
    assert result["all"]["median"] == pytest.approx(
        sorted(a / b for a, b in zip(rates["default"], rates["none"], strict=True))[2]
    )


def test_cuda_graph_decode_needs_a_cuda_model():
    model = engine.build(small_config(num_hidden_layers=1), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        measure_variants(model, variants_and_pairings()[0][:1], 1, Settings(), cuda_graph=True)


def test_spread_and_mad():
    assert throughput.spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert baselines.mad_rel([1.0, 2.0, 3.0]) == pytest.approx(0.5)


@pytest.mark.gpu
@pytest.mark.timing
def test_default_fusions_decode_faster_than_none_on_the_gpu():
    model = engine.build(dtype=torch.bfloat16)
    chosen = [v for v in variants_and_pairings()[0] if v.name in ("default", "none")]
    rates = measure_variants(model, chosen, 1, Settings(rounds=5))
    result = speedups(rates, [p for p in variants_and_pairings()[1] if p.name == "all"])
    assert result["all"]["median"] > 1.0, result
