"""The engine against transformers' Qwen3ForCausalLM on the same weights, with the default
fusions, every step unfused, and the alternative fusion (add+RMSNorm) on.

The checkpoint is written by transformers (save_pretrained, safetensors) and read by our
loader; transformers is teacher-forced on the engine's greedy tokens, so every step (prefill
logits, then each decode step) is compared on its own.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    assert_greedy_equal,
    assert_logits_close,
    engine_logits_over_generation,
    hf_logits,
    hf_qwen3,
    save_hf_checkpoint,
    small_config,
)

import engine

# fp32 bound. Each op of both models is exact to a few float32 ulps (fp32 GEMMs of K <= 128
# reach ~K * 6e-8 relative). Through a
# few layers these stay ~1e-6 of logits of size ~0.5; 1e-4 absolute and 1e-4 norm-relative
# leave two orders of margin while any real bug (a missing norm weight, a RoPE off by one
# position, the wrong KV head) moves logits by >1e-2.
FP32_MAX_ABS, FP32_NORM_REL = 1e-4, 1e-4

# bf16 bound at the 0.6B config. Both models round every op's output to bf16 (2**-8 relative);
# each fused step is within 1 ulp of its unfused ops (docs/definitions.md), the other ops
# within 1-3 ulps
# of transformers' rounding (tests/test_*_numerics.py). Over 28 layers these independent
# rounding errors add up like a random walk on the residual stream, sqrt(28 layers * ~9 ops) *
# 2**-8 ~ 6% of a logit's scale in the worst case, ~1-2% typical: 5e-2 norm-relative (no
# max-abs bound: bf16 logits of random weights tie and round a whole ulp apart).
BF16_NORM_REL = 5e-2


FLAGS = {
    "default": "default",
    "none": "none",
    "alternative": "o_proj_residual,add_rms_norm,norm_gate_up_silu",
}


def _compare(hf_model, directory, *, dtype, device, batch, prompt_len, steps, fused, bounds):
    model = engine.build(checkpoint=directory, dtype=dtype, device=device, flags=FLAGS[fused])
    runner = engine.Runner(model, max_batch_size=batch, max_seq_len=prompt_len + steps)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    tokens, logits = engine_logits_over_generation(runner, prompt, steps)
    full = torch.cat([prompt, tokens[:, :-1]], dim=1)
    ref = hf_logits(hf_model, full)[:, prompt_len - 1 :]
    max_abs, norm_rel = bounds
    what = f"fusions {fused}, {dtype}"
    assert_logits_close(logits, ref, max_abs=max_abs, norm_rel=norm_rel, what=what)
    # A token may differ only where transformers' top-2 margin is within the logits error
    # actually measured (twice it: both top-2 logits may move): that is a tie, not a bug.
    margin = 2 * (logits.double() - ref.double()).abs().max().item()
    return assert_greedy_equal(tokens, ref, margin=margin, what=what)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("fused", list(FLAGS))
def test_small_model_matches_transformers_fp32(tmp_path, tied, fused, device):
    config = small_config(num_hidden_layers=3, tie_word_embeddings=tied)
    hf = hf_qwen3(config, device=device)
    save_hf_checkpoint(hf, tmp_path)
    decisive, total = _compare(
        hf,
        tmp_path,
        dtype=torch.float32,
        device=device,
        batch=2,
        prompt_len=7,
        steps=6,
        fused=fused,
        bounds=(FP32_MAX_ABS, FP32_NORM_REL),
    )
    assert decisive == total, "a top-2 tie in fp32 logits: rerun with another --seed"


@pytest.mark.gpu
@pytest.mark.parametrize("fused", list(FLAGS))
def test_qwen3_0_6b_matches_transformers_bf16(tmp_path, fused):
    config = engine.default_config()
    hf = hf_qwen3(config, dtype=torch.bfloat16, device="cuda")
    save_hf_checkpoint(hf, tmp_path)
    decisive, total = _compare(
        hf,
        tmp_path,
        dtype=torch.bfloat16,
        device="cuda",
        batch=2,
        prompt_len=32,
        steps=8,
        fused=fused,
        bounds=(float("inf"), BF16_NORM_REL),
    )
    assert decisive > 0, f"no step of {total} had a decisive top-2 margin: nothing compared"
