"""Kernel timing the way GPU.md prescribes: a chain of calls over distinct weights, captured
in one CUDA graph, timed by replays.

- 28 distinct layer weights (as many as Qwen3-0.6B has layers): together more bytes than the
  H100's 50 MB L2, so each call streams its weight from DRAM instead of from cache.
- The residual is chained (call i's output is call i+1's residual), as in the model.
- The graph holds ``reps`` passes over the 28 layers so that the replay's own launch cost is
  spread over many calls; time per call = replay time / (layers * reps), median of rounds.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.fused_attn_output import fused_attn_output_residual

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fused_step(x, r, w):
    return fused_attn_output_residual(x, r, w)


def linear_add_step(x, r, w):
    return r + F.linear(x, w)


def addmm_step(x, r, w):
    return r.addmm_(x, w.T)


def compiled_linear_add_step(mode: str | None = "max-autotune-no-cudagraphs") -> Step:
    return torch.compile(linear_add_step, mode=mode, dynamic=False)


PEERS: dict[str, Callable[[], Step]] = {
    "fused": lambda: fused_step,
    "linear_add": lambda: linear_add_step,
    "addmm_": lambda: addmm_step,
    "compile": compiled_linear_add_step,
}


@dataclasses.dataclass
class ChainInputs:
    xs: list[torch.Tensor]
    ws: list[torch.Tensor]
    residual: torch.Tensor

    @classmethod
    def draw(cls, M, N, K, dtype=torch.bfloat16, layers=28, device="cuda", seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        xs = [torch.randn(M, K, device=device, generator=g).to(dtype) for _ in range(layers)]
        ws = [
            (0.02 * torch.randn(N, K, device=device, generator=g)).to(dtype) for _ in range(layers)
        ]
        residual = torch.randn(M, N, device=device, generator=g).to(dtype)
        return cls(xs, ws, residual)


class GraphChain:
    """``step`` over every layer, ``reps`` times, captured once; ``replay()`` runs it."""

    def __init__(self, step: Step, inputs: ChainInputs, reps: int):
        self.calls = len(inputs.ws) * reps
        self._residual = inputs.residual.clone()
        # Warm up on a side stream (compiles Triton/inductor code, sets up cuBLAS handles).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(step, inputs, 1)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._run(step, inputs, reps)
        torch.cuda.synchronize()

    def _run(self, step, inputs, reps):
        r = self._residual
        for _ in range(reps):
            for x, w in zip(inputs.xs, inputs.ws, strict=True):
                r = step(x, r, w)
        return r

    def replay(self) -> None:
        self.graph.replay()

    def us_per_call(self, rounds: int = 15, replays_per_round: int = 5) -> list[float]:
        """Event-timed µs per call, one value per round (after two warm-up replays)."""
        for _ in range(2):
            self.replay()
        samples = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays_per_round):
                self.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / (replays_per_round * self.calls))
        return samples


def median_us_per_call(step: Step, inputs: ChainInputs, reps: int = 4, rounds: int = 15) -> float:
    return statistics.median(GraphChain(step, inputs, reps).us_per_call(rounds))


def floor_us(M: int, N: int, K: int, dtype=torch.bfloat16, bandwidth_tb_s: float = 2.86) -> float:
    """Bytes that must move (weight + activations + residual in + out) over copy bandwidth."""
    size = torch.finfo(dtype).bits // 8
    bytes_moved = size * (N * K + M * K + 2 * M * N)
    return bytes_moved / (bandwidth_tb_s * 1e12) * 1e6
