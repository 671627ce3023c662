"""Which fusions the engine uses. One object per model, shared by all layers, read every step:
changing a field at run time switches the path on the same loaded weights."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class FusionFlags:
    # o_proj GEMM + attention residual add in one Triton launch (kernels/fused_attn_output.py)
    # instead of F.linear then torch.add (two kernels).
    fuse_o_proj_residual: bool = True

    def key(self) -> tuple:
        """Hashable snapshot: CUDA graphs are captured per (batch size, flags)."""
        return dataclasses.astuple(self)
