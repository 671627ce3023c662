"""The fusion registry: one declaration per fusion, and every part of the suite iterates over it.

A declaration names the run of engine ops it replaces (engine/qwen3.py lists the ops) and the
kernel that does it in one launch; engine/program.py derives the rest (its unfused path, its
float64 reference, its inputs at model shapes, its alternatives). The engine runs any
combination of non-alternative fusions (engine/flags.py); the suite counts each one's
launches, checks its numerics through the engine's call path, times it against its unfused
ops and peers, gates it and shows it in the report, with no other edit. docs/add-a-fusion.md
walks through adding one.

Each name is the fusion's flag, marker (NVTX range), JSON key and test id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from engine.program import Fusion, Stage
from kernels import all_reduce_residual as ar
from kernels.linear_residual import linear_residual
from kernels.mlp_block import mlp_block, mlp_block_down, mlp_block_gate_up
from kernels.rms_norm import add_rms_norm
from kernels.rms_norm_linear import rms_norm_linear
from kernels.rms_norm_swiglu import rms_norm_swiglu

_FUSIONS: dict[str, Fusion] = {}
# Whether this process lists the fusions that need every rank (``Fusion.needs_ranks``): only
# one that builds a tensor-parallel model does. A single-process model has no span for them,
# and the single-process baselines list exactly the fusions listed here.
_with_ranks = False


def register(fusion: Fusion) -> Fusion:
    """Add a fusion to the registry (its name must be new)."""
    if fusion.name in _FUSIONS:
        raise ValueError(f"a fusion named {fusion.name!r} is already registered")
    _FUSIONS[fusion.name] = fusion
    return fusion


@contextlib.contextmanager
def registered(fusion: Fusion) -> Iterator[Fusion]:
    """Register ``fusion`` for the duration of the block (tests)."""
    register(fusion)
    try:
        yield fusion
    finally:
        del _FUSIONS[fusion.name]


def list_rank_fusions(on: bool = True) -> None:
    """List the fusions that need every rank from now on (a process building a tensor-parallel
    model; ``on=False``: the single-process list again)."""
    global _with_ranks
    _with_ranks = on


@contextlib.contextmanager
def rank_fusions_listed() -> Iterator[None]:
    """List the fusions that need every rank for the duration of the block (tests)."""
    saved = _with_ranks
    list_rank_fusions()
    try:
        yield
    finally:
        list_rank_fusions(saved)


def rank_fusions() -> list[Fusion]:
    """The registered fusions that need every rank, listed or not."""
    return [f for f in _FUSIONS.values() if f.needs_ranks]


def all_fusions() -> list[Fusion]:
    """Every registered fusion this process lists, in registration order (the ones that need
    every rank only in a tensor-parallel process)."""
    return [f for f in _FUSIONS.values() if _with_ranks or not f.needs_ranks]


def get(name: str) -> Fusion:
    listed = {f.name: f for f in all_fusions()}
    if name not in listed:
        raise ValueError(f"unknown fusion {name!r}; registered: {', '.join(listed)}")
    return listed[name]


def _addmm_peer(x: str, weight: str):
    """cuBLAS's GEMM with the residual in its epilogue, the best one-launch torch peer of a
    projection + residual add: the span's inputs ``x`` and ``weight`` by role name."""
    return lambda residual, **inputs: residual.addmm_(inputs[x], inputs[weight].T)


def _register_linear_residual(name: str, span, fused, *, x: str, weight: str, doc: str, **more):
    """A projection and the residual add after it, in place, in one kernels/linear_residual.py
    launch."""
    register(
        Fusion(
            name,
            spans=(span,),
            fused=fused,
            outputs=("residual",),
            kernel="linear_residual",
            kernel_names=("_gemv_residual_kernel",),
            peers={"addmm_": _addmm_peer(x, weight)},
            doc=doc,
            **more,
        )
    )


_register_linear_residual(
    "o_proj_residual",
    ("o_proj", "attn_residual_add"),
    fused=lambda attn, residual, o_proj_weight: linear_residual(
        attn, residual, o_proj_weight, out=residual
    ),
    x="attn",
    weight="o_proj_weight",
    doc="attention output projection + attention residual add (in place)",
)
register(
    Fusion(
        "add_rms_norm",
        spans=(("residual_add", "input_norm"), ("residual_add", "final_norm")),
        fused=lambda residual, mlp_out, norm_weight, eps: add_rms_norm(
            mlp_out, residual, norm_weight, eps
        ),
        outputs=("normed", "residual"),
        kernel="rms_norm",
        kernel_names=("_rms_norm_kernel",),
        default=False,  # the default runs its alternatives down_proj_residual + norm_qkv_proj
        doc="MLP residual add + the next RMSNorm (residual updated in place)",
    )
)
register(
    Fusion(
        "norm_qkv_proj",
        spans=(("input_norm", "qkv_proj"),),
        fused=lambda residual, norm_weight, eps, qkv_weight: rms_norm_linear(
            residual, norm_weight, qkv_weight, eps
        ),
        outputs=("qkv",),
        kernel="rms_norm_linear",
        kernel_names=("_rms_norm_linear_kernel",),
        doc="input RMSNorm computed in the q/k/v projection's prologue",
    )
)
register(
    Fusion(
        "norm_gate_up_silu",
        spans=(("post_attention_norm", "gate_up_proj", "silu_mul"),),
        fused=lambda residual, norm_weight, eps, gate_up_weight: rms_norm_swiglu(
            residual, norm_weight, gate_up_weight, eps
        ),
        outputs=("act",),
        kernel="rms_norm_swiglu",
        kernel_names=("_rms_norm_swiglu_kernel",),
        doc="post-attention RMSNorm + gate/up projection + SiLU(gate) * up",
    )
)
_register_linear_residual(
    "down_proj_residual",
    ("down_proj", "residual_add"),
    fused=lambda act, residual, down_proj_weight: linear_residual(
        act, residual, down_proj_weight, out=residual
    ),
    x="act",
    weight="down_proj_weight",
    doc="MLP down projection + MLP residual add (in place)",
)

register(
    Fusion(
        "mlp_block",
        spans=(("post_attention_norm", "gate_up_proj", "silu_mul", "down_proj", "residual_add"),),
        fused=lambda residual, norm_weight, eps, gate_up_weight, down_proj_weight: mlp_block(
            residual, norm_weight, gate_up_weight, down_proj_weight, eps
        ),
        outputs=("residual",),
        kernel="mlp_block",
        kernel_names=("_mlp_block_kernel",),
        stages=(
            Stage(
                "gate_up",
                ("post_attention_norm", "gate_up_proj", "silu_mul"),
                lambda residual, norm_weight, eps, gate_up_weight: mlp_block_gate_up(
                    residual, norm_weight, gate_up_weight, eps
                ),
                ("act",),
            ),
            Stage(
                "down",
                ("down_proj", "residual_add"),
                lambda act, down_proj_weight, residual: mlp_block_down(
                    act, residual, down_proj_weight
                ),
                ("residual",),
            ),
        ),
        # Off by default until measured against its alternatives, norm_gate_up_silu +
        # down_proj_residual (two launches a layer).
        default=False,
        doc="the MLP block in one persistent launch: post-attention RMSNorm + gate/up + "
        "SiLU * up, a grid barrier, down projection + MLP residual add (in place)",
    )
)


def _fused_all_reduce_residual(residual, group, **partial):
    (x,) = partial.values()  # o (attention span) or mlp_out (MLP span)
    return ar.all_reduce_residual(x, residual, group, out=residual)


register(
    Fusion(
        "all_reduce_residual",
        spans=(
            ("o_proj_all_reduce", "attn_residual_add"),
            ("down_proj_all_reduce", "residual_add"),
        ),
        fused=_fused_all_reduce_residual,
        outputs=("residual",),
        kernel="all_reduce_residual",
        kernel_names=("_one_shot_all_reduce_residual_kernel",),
        # On by default under TP: on two H100s its kernel takes 4.2-4.8 µs against 7.7-8.7 µs
        # for NCCL's all-reduce + the add at decode sizes (docs/notes.md).
        default=True,
        needs_ranks=True,
        doc="tensor parallel: all-reduce of a row-parallel projection's partial sums + the "
        "residual add (in place), one-shot over symmetric memory",
    )
)
