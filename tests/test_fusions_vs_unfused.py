"""Every registered fusion in the engine: the same weights with and without it give close
logits and equal greedy tokens; flags switch paths at run time; the segments the engine runs
are the registered fused callables (a planted error in one shows in the logits)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    assert_greedy_equal,
    assert_logits_close,
    engine_logits_over_generation,
    small_config,
)

import engine
from engine import fusions as registry
from engine.program import Fusion
from profiling.throughput import variants_and_pairings

# fp32: each fused step is within a few float32 ulps of its unfused ops (~1e-7 relative);
# through the model's few layers logits (~0.5) differ by ~1e-6. 1e-4 keeps two orders of
# margin and catches any real difference in a step (a dropped residual moves logits by ~1e-1).
FP32_MAX_ABS, FP32_NORM_REL = 1e-4, 1e-4
# bf16 (GPU): per call a fused step is within 1 ulp of its unfused ops; an ulp on the
# residual stream, carried through 28 layers and four fused steps a layer, stays within a few
# percent of the logits' norm.
BF16_NORM_REL = 3e-2

PAIRINGS = {p.name: p for p in variants_and_pairings()[1]}
VARIANTS = {v.name: v for v in variants_and_pairings()[0]}


def _generate(model, prompt, steps, tokens=None):
    runner = engine.Runner(model, max_batch_size=prompt.shape[0], max_seq_len=64)
    if tokens is None:
        return engine_logits_over_generation(runner, prompt, steps)
    logits = [runner.prefill(prompt).float()]
    for i in range(steps - 1):
        logits.append(runner.decode(tokens[:, i]).float())
    return tokens, torch.stack(logits, 1)


def _check_pairing(model, pairing, prompt, steps, *, max_abs, norm_rel):
    """The variant with the fusion against the same without it, teacher-forced on the
    former's tokens so that each step is compared alone."""
    model.flags = VARIANTS[pairing.on].flags()
    tokens, on = _generate(model, prompt, steps)
    model.flags = VARIANTS[pairing.off].flags()
    _, off = _generate(model, prompt, steps, tokens)
    what = f"{pairing.on} vs {pairing.off}"
    assert_logits_close(on, off, max_abs=max_abs, norm_rel=norm_rel, what=what)
    margin = 2 * (on - off).abs().max().item()
    return assert_greedy_equal(tokens, off, margin=margin, what=what)


@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_fusion_matches_its_unfused_ops_fp32(pairing, device):
    model = engine.build(small_config(num_hidden_layers=3), dtype=torch.float32, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), device=device)
    _check_pairing(
        model, PAIRINGS[pairing], prompt, 5, max_abs=FP32_MAX_ABS, norm_rel=FP32_NORM_REL
    )


@pytest.mark.gpu
@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_fusion_matches_its_unfused_ops_qwen3_0_6b_bf16(pairing, device):
    model = engine.build(dtype=torch.bfloat16, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 32), device=device)
    decisive, _ = _check_pairing(
        model, PAIRINGS[pairing], prompt, 12, max_abs=float("inf"), norm_rel=BF16_NORM_REL
    )
    assert decisive > 0


def test_flags_switch_the_segments_at_run_time(device, monkeypatch):
    """Mid-generation changes reach every layer: each step runs the fused callables the flags
    name, and nothing else fused."""
    model = engine.build(small_config(), dtype=torch.float32, device=device)
    calls: list[str] = []
    for f in registry.all_fusions():
        real = f.fused

        def recording(*args, _real=real, _name=f.name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setitem(registry._FUSIONS, f.name, _replace(f, fused=recording))
    runner = engine.Runner(model, max_seq_len=32)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), device=device)
    token = runner.prefill(prompt).argmax(-1)
    layers = model.config.num_hidden_layers
    for spec in ("none", "o_proj_residual", "default"):
        model.flags = engine.FusionFlags.parse(spec)
        calls.clear()
        token = runner.decode(token).argmax(-1)
        expected = sorted(f for f in model.flags.enabled for _ in range(layers))
        assert sorted(calls) == expected, spec


def _replace(fusion: Fusion, **changes) -> Fusion:
    import dataclasses

    return dataclasses.replace(fusion, **changes)


@pytest.mark.parametrize("name", [f.name for f in registry.all_fusions()])
def test_a_planted_error_in_a_fused_step_shows_in_the_logits(name, device, monkeypatch):
    """The engine runs what the registry declares: scaling one fused step's first output by
    1.01 moves the logits (so the tests above can fail)."""
    fusion = registry.get(name)
    model = engine.build(
        small_config(),
        dtype=torch.float32,
        device=device,
        flags=VARIANTS[PAIRINGS[name].on].flags(),
    )
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), device=device)
    good = engine.Runner(model, max_seq_len=16).prefill(prompt)

    def planted(**kwargs):
        out = fusion.fused(**kwargs)
        return out * 1.01 if isinstance(out, torch.Tensor) else (out[0] * 1.01, *out[1:])

    monkeypatch.setitem(registry._FUSIONS, name, _replace(fusion, fused=planted))
    model._segments.clear()
    bad = engine.Runner(model, max_seq_len=16).prefill(prompt)
    with pytest.raises(AssertionError, match="planted"):
        assert_logits_close(bad, good, max_abs=FP32_MAX_ABS, norm_rel=FP32_NORM_REL, what="planted")


@pytest.mark.parametrize("layers", [24, 28])
def test_deep_configs_run_default_and_unfused(layers, device):
    config = small_config(
        num_hidden_layers=layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
    )
    model = engine.build(config, dtype=torch.float32, device=device)
    assert len(model.model.layers) == layers
    prompt = torch.randint(0, config.vocab_size, (1, 3), device=device)
    _check_pairing(model, PAIRINGS["all"], prompt, 3, max_abs=FP32_MAX_ABS, norm_rel=FP32_NORM_REL)
