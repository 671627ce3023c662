"""The original plan's entry point for the attention-output fusion, kept as a documented name.

``fused_attn_output_residual(attn_output, residual, o_proj_weight, residual_weight=1.0, *,
out=None)`` is ``kernels.linear_residual.linear_residual`` with the argument names of the
attention block: ``residual_weight * residual + attn_output @ o_proj_weight.T`` in one launch,
accumulated in float32 and rounded once. The engine registers this maths as the
``o_proj_residual`` step (and again as ``down_proj_residual``); see kernels/linear_residual.py
for the contract, the paths and the checks.
"""

from __future__ import annotations

import torch

from kernels.linear_residual import linear_residual_named


def fused_attn_output_residual(
    attn_output: torch.Tensor,
    residual: torch.Tensor,
    o_proj_weight: torch.Tensor,
    residual_weight: float = 1.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual_weight * residual + attn_output @ o_proj_weight.T`` in one launch.

    attn_output [..., K], residual [..., N], o_proj_weight [N, K]; ``out`` may be ``residual``
    (in place). Errors name these arguments.
    """
    names = ("attn_output", "residual", "o_proj_weight")
    return linear_residual_named(attn_output, residual, o_proj_weight, residual_weight, out, names)
