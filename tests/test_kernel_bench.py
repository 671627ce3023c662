"""Kernel benchmark (pytest-benchmark): the fused kernel against what a user could pick instead
(F.linear + add, residual.addmm_(x, W.T), torch.compile of linear+add), per Qwen3 o_proj shape
and M. Timed per GPU.md: 28 distinct weights (more than L2) chained in one CUDA graph, replayed.

pytest-benchmark's stats are seconds per replay (calls_per_replay calls); extra_info holds the
event-timed median in µs per call (per layer), which is what the README and notes quote.
Run: tox -e bench   (or pytest -m bench tests/test_kernel_bench.py --benchmark-save=...)
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from profiling.kernel_timing import PEERS, ChainInputs, GraphChain, floor_us

pytestmark = [pytest.mark.gpu, pytest.mark.bench]

SHAPES = {"0.6b": (1024, 2048), "1.7b": (2048, 2048), "4b": (2560, 4096), "8b": (4096, 4096)}
M_VALUES = [1, 8, 64, 512, 2048]
IMPLS = [p for p in PEERS if p in os.environ.get("FUSIONGUARD_BENCH_IMPLS", ",".join(PEERS))]


@pytest.fixture(scope="module")
def steps():
    return {name: make() for name, make in PEERS.items()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", M_VALUES)
@pytest.mark.parametrize("shape", SHAPES)
def test_o_proj_residual_kernel(benchmark, steps, shape, M, impl):
    N, K = SHAPES[shape]
    inputs = ChainInputs.draw(M, N, K, torch.bfloat16)
    reps = 16 if M <= 64 else 4
    chain = GraphChain(steps[impl], inputs, reps)
    us = statistics.median(chain.us_per_call(rounds=21))
    benchmark.group = f"o_proj {shape} N={N} K={K} M={M}"
    benchmark.extra_info.update(
        impl=impl,
        shape=shape,
        M=M,
        N=N,
        K=K,
        dtype="bfloat16",
        calls_per_replay=chain.calls,
        us_per_call=round(us, 4),
        floor_us=round(floor_us(M, N, K), 4),
    )

    def replay():
        chain.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=30, iterations=1, warmup_rounds=3)
