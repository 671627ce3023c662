"""Shared pieces of the engine tests: small configs, HF reference checkpoints, comparisons."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import config as config_module
from engine.config import Qwen3Config


def small_config(**changes) -> Qwen3Config:
    return config_module.small_config(**changes)


def hf_qwen3(config: Qwen3Config, *, dtype=torch.float32, device="cpu", perturb_norms=True):
    """transformers' Qwen3ForCausalLM with the same architecture, random weights.

    Norm weights are perturbed away from 1 so that a norm weight applied in the wrong place
    (or not at all) changes the logits.
    """
    import transformers

    hf_config = transformers.Qwen3Config(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        attn_implementation="eager",
    )
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config).to(dtype).eval()
    if perturb_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.2 * torch.randn_like(param))
    return model


def save_hf_checkpoint(hf_model, directory: Path, **save_kwargs) -> Path:
    hf_model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return directory


@torch.inference_mode()
def hf_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at every position [B, S, V] (float32), full forward, no cache."""
    return hf_model(input_ids=input_ids.to(hf_model.device)).logits.float()


def engine_logits_over_generation(runner, prompt: torch.Tensor, steps: int):
    """Greedy generation with the engine, keeping every step's logits.

    Returns (tokens [B, steps], logits [B, steps, V] float32): step 0 is the prefill's.
    """
    logits = [runner.prefill(prompt).float()]
    tokens = [logits[-1].argmax(-1)]
    for _ in range(steps - 1):
        logits.append(runner.decode(tokens[-1]).float())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def assert_logits_close(got, ref, *, max_abs: float, norm_rel: float, what: str):
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite logits"
    err = (got - ref).abs()
    rel = (err.norm() / ref.norm()).item()
    assert err.max().item() <= max_abs and rel <= norm_rel, (
        f"{what}: max |diff| {err.max().item():.3g} (bound {max_abs:.3g}), "
        f"norm-relative {rel:.3g} (bound {norm_rel:.3g})"
    )


def assert_greedy_equal(tokens, ref_logits, *, margin: float, what: str):
    """Greedy tokens [B, S] equal the reference's argmax at each step, except where the
    reference's top-2 margin is within ``margin`` (a tie at the stated precision is no bug).
    The reference is teacher-forced on the same tokens, so every step is judged alone."""
    top2 = ref_logits.double().topk(2, dim=-1)
    ref_tokens = top2.indices[..., 0].to(tokens.device)
    decisive = (top2.values[..., 0] - top2.values[..., 1]) > margin
    wrong = (tokens != ref_tokens) & decisive.to(tokens.device)
    assert not wrong.any(), (
        f"{what}: greedy tokens differ at (batch, step) {wrong.nonzero().tolist()}: "
        f"got {tokens.tolist()}, reference {ref_tokens.tolist()}"
    )
    return int(decisive.sum()), decisive.numel()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Small-op bound (the numerics rule of docs/definitions.md in spirit): the kernel's error vs
# float64 may exceed the torch
# reference's error in the same dtype by at most this many ulps of the output dtype. The ops
# round intermediates as transformers does (2-3 roundings), and the interpreter truncates where
# the GPU rounds to nearest: each rounding may land one ulp apart. fp32 results are
# held to 16 ulps (~1e-6 relative, far inside the plan's 1e-3): on the GPU, exp and sqrt are the
# fast approximate instructions, a few ulps each.
SMALL_OP_ULPS = 3
FP32_ULPS = 16


def assert_close_to_reference(
    got, ref_same_dtype, ref_float64, *, what: str, ulps=None, magnitude=None
):
    """got and ref_same_dtype in the op's dtype; ref_float64 the exact result.

    ``magnitude``: the size of the terms that were summed, where a result can cancel to much
    less than them (RoPE's x1*cos - x2*sin); ulps are counted at that size. Default: the result.
    """
    from profiling.numerics import ulp

    assert got.dtype == ref_same_dtype.dtype, f"{what}: dtype {got.dtype}"
    if ulps is None:
        ulps = FP32_ULPS if got.dtype == torch.float32 else SMALL_OP_ULPS
    assert got.shape == ref_float64.shape, f"{what}: shape {tuple(got.shape)}"
    finite = torch.isfinite(ref_float64)
    assert torch.isfinite(got[finite]).all(), f"{what}: NaN/inf where the reference is finite"
    err = (got.double() - ref_float64).abs()
    ref_err = (ref_same_dtype.double() - ref_float64).abs()
    magnitude = ref_float64 if magnitude is None else magnitude
    allowed = ref_err + ulps * ulp(magnitude, got.dtype) + 1e-30
    excess = (err - allowed)[finite]
    assert (excess <= 0).all(), (
        f"{what}: {int((excess > 0).sum())} elements off by more than the {got.dtype} "
        f"reference's error + {ulps} ulp; worst |err| {err[finite].max().item():.3g}"
    )


def compile_for_hopper(script: str, **env_extra: str):
    """Run ``script`` in a fresh process whose kernels import in compiled mode, so that it can
    compile them for a GPU with Triton's NVIDIA backend (ptxas) on a machine without one;
    skips where this Triton has no ptxas. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    import pytest
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton has no NVIDIA backend (ptxas) to compile with")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "FUSIONGUARD_TRITON": "compiled"}
    env.update(TRITON_INTERPRET="0", **env_extra)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def swiglu_magnitude(x, norm_weight, gate_up_weight, eps):
    """The size at which ulps of silu(g) * u are counted: each dot's sum of absolute terms
    (|normed| @ |W|.T), carried to first order through silu(g) * u:  |silu'(g) u| *
    sum|g terms| + |silu(g)| * sum|u terms| (float64)."""
    from kernels.rms_norm_linear import rms_norm_float64

    normed = rms_norm_float64(x, norm_weight, eps)
    w = gate_up_weight.double()
    g, u = (normed @ w.T).chunk(2, -1)
    g_terms, u_terms = (normed.abs() @ w.abs().T).chunk(2, -1)
    s = torch.sigmoid(g)
    dsilu = s * (1 + g * (1 - s))
    return (dsilu * u).abs() * g_terms + (g * s).abs() * u_terms
