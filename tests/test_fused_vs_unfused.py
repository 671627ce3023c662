"""Fused vs unfused o_proj + residual in the engine (D2): same weights, logits close,
greedy tokens equal; the flag flips the path at run time; deep configs run."""

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
import engine.qwen3

# fp32: the fused kernel is within D2's 1e-3 of float64 per call and in practice ~1e-6
# (both accumulate in fp32, in a different order); through the model's few layers the
# logits (~0.5) differ by ~1e-6. 1e-4 absolute keeps two orders of margin and catches any
# real difference in the step (a dropped residual moves logits by ~1e-1).
FP32_MAX_ABS, FP32_NORM_REL = 1e-4, 1e-4
# bf16 (GPU): per call the fused result is within 1 ulp of the unfused one (D2); an ulp on the
# residual stream, carried through 28 layers, stays within ~2% of the logits' norm.
BF16_NORM_REL = 2e-2


def _generate(model, prompt, steps):
    runner = engine.Runner(model, max_batch_size=prompt.shape[0], max_seq_len=64)
    return engine_logits_over_generation(runner, prompt, steps)


def _check_paths_agree(model, prompt, steps, *, max_abs, norm_rel):
    model.flags.fuse_o_proj_residual = True
    fused_tokens, fused_logits = _generate(model, prompt, steps)
    model.flags.fuse_o_proj_residual = False
    # Teacher-force the unfused path on the fused tokens: each step is compared alone.
    runner = engine.Runner(model, max_batch_size=prompt.shape[0], max_seq_len=64)
    unfused_logits = [runner.prefill(prompt).float()]
    for i in range(steps - 1):
        unfused_logits.append(runner.decode(fused_tokens[:, i]).float())
    unfused_logits = torch.stack(unfused_logits, 1)
    assert_logits_close(
        fused_logits, unfused_logits, max_abs=max_abs, norm_rel=norm_rel, what="fused vs unfused"
    )
    margin = 2 * (fused_logits - unfused_logits).abs().max().item()
    return assert_greedy_equal(fused_tokens, unfused_logits, margin=margin, what="greedy")


def test_fused_matches_unfused_fp32(device):
    model = engine.build(small_config(num_hidden_layers=3), dtype=torch.float32, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6), device=device)
    _check_paths_agree(model, prompt, 6, max_abs=FP32_MAX_ABS, norm_rel=FP32_NORM_REL)


@pytest.mark.gpu
def test_fused_matches_unfused_qwen3_0_6b_bf16(device):
    model = engine.build(dtype=torch.bfloat16, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (2, 32), device=device)
    decisive, _ = _check_paths_agree(
        model, prompt, 16, max_abs=float("inf"), norm_rel=BF16_NORM_REL
    )
    assert decisive > 0


def test_flag_flips_the_path_at_run_time_on_the_same_weights(device, monkeypatch):
    """Mid-generation flips reach every layer: the kernel each call uses follows the flag."""
    model = engine.build(small_config(), dtype=torch.float32, device=device)
    calls = []
    real = engine.qwen3.o_proj_residual

    def recording(attn_output, residual, weight, fused):
        calls.append(fused)
        return real(attn_output, residual, weight, fused)

    monkeypatch.setattr(engine.qwen3, "o_proj_residual", recording)
    runner = engine.Runner(model, max_seq_len=32)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), device=device)
    token = runner.prefill(prompt).argmax(-1)
    layers = model.config.num_hidden_layers
    for fused in (False, True, False):
        model.flags.fuse_o_proj_residual = fused
        token = runner.decode(token).argmax(-1)
    assert calls == [True] * layers + [False] * layers + [True] * layers + [False] * layers
    assert all(layer.flags is model.flags for layer in model.model.layers)


def test_the_step_is_what_the_layer_uses(device, monkeypatch):
    """A planted error in o_proj_residual shows in the logits (the tests can fail)."""
    model = engine.build(small_config(), dtype=torch.float32, device=device)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), device=device)
    good = engine.Runner(model, max_seq_len=16).prefill(prompt)
    real = engine.qwen3.o_proj_residual
    monkeypatch.setattr(
        engine.qwen3, "o_proj_residual", lambda a, r, w, fused: real(a, r, w, fused) * 1.01
    )
    bad = engine.Runner(model, max_seq_len=16).prefill(prompt)
    with pytest.raises(AssertionError, match="fused vs planted"):
        assert_logits_close(
            bad, good, max_abs=FP32_MAX_ABS, norm_rel=FP32_NORM_REL, what="fused vs planted"
        )


@pytest.mark.parametrize("layers", [24, 28])
def test_deep_configs_run_both_paths(layers, device):
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
    _check_paths_agree(model, prompt, 3, max_abs=FP32_MAX_ABS, norm_rel=FP32_NORM_REL)
