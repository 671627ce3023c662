"""Kernel benchmark (pytest-benchmark): every registered fusion step against its unfused ops
and its one-launch peers, at the default model's shapes and, for the linear+residual steps,
every dense Qwen3 size, from decode to prefill row counts. Timed as the gate times them
(profiling/kernel_timing.py): 28 distinct weight sets chained in one CUDA graph, replayed.

pytest-benchmark's stats are seconds per replay (calls_per_replay calls); extra_info holds the
event-timed median in µs per call (per layer) and the path the fused call took.
Run: tox -e bench   (python -m profiling bench --save records this GPU's run)
"""

from __future__ import annotations

import statistics

import pytest
import torch

from engine import fusions as registry
from engine.config import QWEN3_SIZES, qwen3_config
from engine.program import draw_inputs, span_ops
from engine.qwen3 import Qwen3ForCausalLM
from profiling.kernel_timing import LAYERS, GraphChain, fused_path, implementations

pytestmark = [pytest.mark.gpu, pytest.mark.bench]

M_VALUES = [1, 8, 64, 512, 2048]


def _cases():
    for f in registry.all_fusions():
        sizes = QWEN3_SIZES if f.kernel == "linear_residual" else ["0.6b"]
        for size in sizes:
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
    reps = 8 if M <= 64 else 2
    results = {}
    for name, call in implementations(f, ops).items():
        chain = GraphChain(call, sets, reps)
        results[name] = statistics.median(chain.time_us(3) for _ in range(11))
        del chain
    benchmark.group = f"{fusion} {size} M={M}"
    benchmark.extra_info.update(fusion=fusion, size=size, M=M, us_per_call=results)
    benchmark.extra_info["path"] = fused_path(f, sets[0], M)
    fused = GraphChain(implementations(f, ops)["fused"], sets, reps)
    benchmark.extra_info["calls_per_replay"] = fused.calls

    def replay():
        fused.graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=20, iterations=1, warmup_rounds=3)
