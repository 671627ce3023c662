"""Kernel benchmark (pytest-benchmark): every registered fusion step against its unfused ops
and its one-launch peers, at the default model's shapes and, for the steps with a one-launch
peer, every dense Qwen3 size (profiling.kernel_timing.bench_sizes), from decode to prefill row
counts. Timed as the gate times them (profiling/kernel_timing.py): 28 distinct weight sets
chained in one CUDA graph, replayed.

At decode row counts (``COMPILE_M``) a fusion with a one-launch peer is also timed against
``torch_compile``: torch.compile of the span's torch formulas (kernel_timing.compiled_span).

pytest-benchmark's stats are seconds per replay (calls_per_replay calls); extra_info holds the
event-timed median in µs per call (per layer) and the path the fused call took.
Run: tox -e bench   (python -m profiling bench --save records this GPU's run)
"""

from __future__ import annotations

import statistics

import pytest
import torch

from engine import fusions as registry
from engine.config import qwen3_config
from engine.program import draw_inputs, span_ops
from engine.qwen3 import Qwen3ForCausalLM
from profiling.kernel_timing import (
    LAYERS,
    GraphChain,
    bench_sizes,
    compiled_span,
    fused_path,
    implementations,
)

pytestmark = [pytest.mark.gpu, pytest.mark.bench]

M_VALUES = [1, 8, 64, 512, 2048]
COMPILE_M = (1, 8)  # decode sizes: where the heuristic must stay within 0.95x of every peer


def _cases():
    for f in registry.all_fusions():
        for size in bench_sizes(f):
            for M in M_VALUES:
                yield pytest.param(f.name, size, M, id=f"{f.name}-{size}-m{M}")


@pytest.mark.parametrize(("fusion", "size", "M"), list(_cases()))
def test_fusion_kernel(benchmark, fusion, size, M):
    config = qwen3_config(size).replace(num_hidden_layers=1)
    with torch.device("meta"):
        program = Qwen3ForCausalLM(config).program()
    f = registry.get(fusion)
    ops = span_ops(program, f)
    generator = torch.Generator(device="cuda").manual_seed(0)
    sets = [draw_inputs(ops, config, M, torch.bfloat16, "cuda", generator) for _ in range(LAYERS)]
    benchmark.extra_info.update(fusion=fusion, size=size, M=M, path=fused_path(f, sets[0], M))
    impls = implementations(f, ops)
    if f.peers and M in COMPILE_M:
        impls["torch_compile"] = compiled_span(ops)
    _bench(benchmark, f"{fusion} {size} M={M}", impls, sets, M)


def _bench(benchmark, group: str, impls: dict, sets: list, M: int) -> None:
    """Each implementation's median µs per call into extra_info; the fused chain's replay is
    what pytest-benchmark times (and compares)."""
    reps = 8 if M <= 64 else 2
    results = {}
    for name, call in impls.items():
        chain = GraphChain(call, sets, reps)
        results[name] = statistics.median(chain.time_us(3) for _ in range(11))
        del chain
    benchmark.group = group
    benchmark.extra_info["us_per_call"] = results
    fused = GraphChain(impls["fused"], sets, reps)
    benchmark.extra_info["calls_per_replay"] = fused.calls

    def replay():
        fused.graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=20, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("M", M_VALUES)
def test_linear_residual_out_of_place(benchmark, M):
    """``linear_residual(x, residual, weight)`` with a new output against the out-of-place
    torch peers (``torch.addmm``, ``F.linear`` + add), at the o_proj shape of the default
    model: in place the fused step is one kernel; out of place it writes a new tensor."""
    import torch.nn.functional as F

    from kernels.linear_residual import linear_residual, select_config

    config = qwen3_config("0.6b")
    N, K = config.hidden_size, config.num_attention_heads * config.head_dim
    g = torch.Generator(device="cuda").manual_seed(M)

    def draw():
        return {
            "x": torch.randn(M, K, device="cuda", generator=g).bfloat16(),
            "residual": torch.randn(M, N, device="cuda", generator=g).bfloat16(),
            "weight": (0.02 * torch.randn(N, K, device="cuda", generator=g)).bfloat16(),
        }

    impls = {
        "fused": lambda i: linear_residual(i["x"], i["residual"], i["weight"]),
        "addmm": lambda i: torch.addmm(i["residual"], i["x"], i["weight"].T),
        "linear_add": lambda i: F.linear(i["x"], i["weight"]) + i["residual"],
    }
    path = select_config(M, N, K, torch.bfloat16).path
    benchmark.extra_info.update(size="0.6b", M=M, path=path)
    sets = [draw() for _ in range(LAYERS)]
    _bench(benchmark, f"linear_residual out of place 0.6b M={M}", impls, sets, M)
