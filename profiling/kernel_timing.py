"""Kernel time of a fusion step: a CUDA-graph chain over distinct weights, timed interleaved
with its references in one process (docs/definitions.md, "Kernel timing").

- Each implementation of the step (the fused callable, the span's unfused ops, each peer) is
  called once per layer over ``layers`` distinct input sets (weights and activations drawn at
  the model's shapes): 28 layers of Qwen3-0.6B weights are more bytes than the H100's 50 MB
  L2, so every call streams its weight from DRAM, as in the model.
- The chain holds ``reps`` passes over the layers, captured once in a CUDA graph, so that the
  replay's own launch cost is spread over many calls; time per call = replay time / calls.
- Rounds alternate the implementations (fused, unfused, peers, fused, ...), so that clock and
  thermal drift cancel in the ratio fused / reference of each round; the figure is the median
  of the per-round ratios. Measured on the H100, the fused/addmm_ ratio of one step repeats to
  0.05% across processes, far sharper than an absolute time compared across runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.config import QWEN3_SIZES
from engine.program import Fusion, call_fused, draw_inputs, external_reads, run_unfused, span_ops
from profiling.ranks import aligner

LAYERS = 28
REFERENCE_UNFUSED = "unfused"
DEFAULT_SIZE = "0.6b"


def bench_sizes(fusion: Fusion) -> list[str]:
    """The Qwen3 sizes the kernel benchmark times ``fusion`` at (and onboarding tunes): every
    dense size for a fusion with a one-launch peer to beat, the default model's otherwise."""
    return list(QWEN3_SIZES) if fusion.peers else [DEFAULT_SIZE]


class GraphChain:
    """``call(inputs)`` for every input set, ``reps`` times, captured once in a CUDA graph."""

    def __init__(self, call: Callable[[dict], Any], input_sets: Sequence[dict], reps: int):
        self.calls = len(input_sets) * reps
        # Warm up on a side stream: compiles Triton kernels, sets up cuBLAS handles.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for inputs in input_sets:
                call(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            for _ in range(reps):
                for inputs in input_sets:
                    call(inputs)
        torch.cuda.synchronize()

    def time_us(self, replays: int, align: Callable[[], None] | None = None) -> float:
        """Event-timed µs per call over ``replays`` replays (``align``: start every rank
        together first, for chains of collectives)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if align is not None:
            align()
        start.record()
        for _ in range(replays):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (replays * self.calls)


def implementations(fusion: Fusion, ops) -> dict[str, Callable[[dict], Any]]:
    """The fused step, its unfused ops and its peers, each as ``call(inputs)``."""
    reads = [r.name for r in external_reads(ops)]
    impls = {
        "fused": lambda inputs: call_fused(fusion, ops, inputs),
        REFERENCE_UNFUSED: lambda inputs: run_unfused(ops, inputs),
    }
    for name, peer in fusion.peers.items():
        impls[name] = lambda inputs, peer=peer: peer(**{n: inputs[n] for n in reads})
    return impls


# Kernels with two paths (the Triton GEMV, cuBLAS's GEMM with the epilogue), chosen per shape
# by their select_config, and how many weight rows make one output column of the tables' key
# (rms_norm_swiglu pairs a gate and an up row).
_ROWS_PER_OUTPUT = {"linear_residual": 1, "rms_norm_linear": 1, "rms_norm_swiglu": 2}


def fused_path(fusion: Fusion, inputs: dict, rows: int) -> str:
    """Which path the fused call takes for ``inputs`` at ``rows`` tokens: "gemv" or "cublas"
    (the kernel's own choice: a forced config, this GPU's tuned table, else its heuristic), or
    "triton" for kernels with one path."""
    if fusion.kernel not in _ROWS_PER_OUTPUT:
        return "triton"
    kernel = importlib.import_module(f"kernels.{fusion.kernel}")
    (weight,) = [v for k, v in inputs.items() if k.endswith("_weight") and v.dim() == 2]
    N, K = weight.shape[0] // _ROWS_PER_OUTPUT[fusion.kernel], weight.shape[1]
    return kernel.select_config(rows, N, K, weight.dtype).path


@dataclasses.dataclass
class RatioResult:
    """fused / reference per round, and each implementation's µs per call per round;
    ``path``: the fused call's (fused_path)."""

    fusion: str
    rows: int
    us: dict[str, list[float]]
    path: str = "triton"

    def ratios(self, reference: str) -> list[float]:
        return [f / r for f, r in zip(self.us["fused"], self.us[reference], strict=True)]

    def ratio(self, reference: str) -> float:
        return statistics.median(self.ratios(reference))

    def references(self) -> list[str]:
        return [name for name in self.us if name != "fused"]

    def median_us(self, name: str) -> float:
        return statistics.median(self.us[name])


def time_fusion(
    fusion: Fusion,
    program,
    config,
    rows: int,
    dtype: torch.dtype,
    *,
    layers: int = LAYERS,
    reps: int = 4,
    rounds: int = 11,
    replays: int = 3,
    seed: int = 0,
    only: Sequence[str] | None = None,
) -> RatioResult:
    """Time ``fusion``'s implementations at ``rows`` tokens, interleaved round by round."""
    ops = span_ops(program, fusion)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    input_sets = [draw_inputs(ops, config, rows, dtype, "cuda", generator) for _ in range(layers)]
    impls = implementations(fusion, ops)
    if only is not None:
        impls = {name: impls[name] for name in only}
    us = time_chains(impls, input_sets, reps=reps, rounds=rounds, replays=replays)
    return RatioResult(fusion.name, rows, us, fused_path(fusion, input_sets[0], rows))


def time_chains(
    impls: dict[str, Callable[[dict], Any]],
    input_sets: Sequence[dict],
    *,
    reps: int,
    rounds: int,
    replays: int,
    align: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """µs per call of each implementation per round, interleaved. Fixed counts throughout
    (no loop that runs until a time is reached): under TP every rank replays the same chains
    the same number of times, so a captured collective always meets its peers'."""
    chains = {name: GraphChain(call, input_sets, reps) for name, call in impls.items()}
    for chain in chains.values():
        chain.time_us(2)  # warm-up replays
    us: dict[str, list[float]] = {name: [] for name in chains}
    order = list(chains)
    for r in range(rounds):
        # Alternate the order round by round (ABC, CBA, ...): drift within a round cancels.
        for name in order if r % 2 == 0 else reversed(order):
            us[name].append(chains[name].time_us(replays, align))
    del chains
    return us


def time_all_reduce_residual(
    parallel,
    hidden: int,
    rows: int,
    dtype: torch.dtype,
    *,
    layers: int = LAYERS,
    reps: int = 4,
    rounds: int = 11,
    replays: int = 3,
    seed: int = 0,
) -> RatioResult | None:
    """The TP-only step on every rank of ``parallel``: the one-shot kernel against its unfused
    ops (NCCL all-reduce in place, then the residual add), at ``rows`` x ``hidden``. None where
    the kernel cannot run (kernels.all_reduce_residual.unavailable_reason; a collective)."""
    from kernels import all_reduce_residual as ar

    device = torch.device("cuda", torch.cuda.current_device())
    group = parallel.group
    if ar.unavailable_reason(device, group) is not None:
        return None
    generator = torch.Generator(device="cuda").manual_seed(seed * 31 + parallel.rank + 1)
    # Partials stay small: the in-place all-reduce feeds each call's sum to the next one.
    input_sets = [
        {
            "x": (1e-3 * torch.randn(rows, hidden, device="cuda", generator=generator)).to(dtype),
            "residual": torch.randn(rows, hidden, device="cuda", generator=generator).to(dtype),
        }
        for _ in range(layers)
    ]
    impls = {
        "fused": lambda i: ar.all_reduce_residual(i["x"], i["residual"], group, out=i["residual"]),
        REFERENCE_UNFUSED: lambda i: ar.reference(i["x"], i["residual"], group),
    }
    align = aligner(parallel, device)  # every rank starts each timed chain together
    us = time_chains(impls, input_sets, reps=reps, rounds=rounds, replays=replays, align=align)
    return RatioResult("all_reduce_residual", rows, us)


def fused_us_per_call(
    fusion: Fusion, program, config, rows: int, dtype: torch.dtype, **kwargs
) -> float:
    """Median µs per call of the fused step alone (the tuner's figure)."""
    return time_fusion(fusion, program, config, rows, dtype, only=("fused",), **kwargs).median_us(
        "fused"
    )


def floor_us(bytes_moved: int, bandwidth_tb_s: float) -> float:
    """Bytes that must move over a measured bandwidth, in µs."""
    return bytes_moved / (bandwidth_tb_s * 1e12) * 1e6


def copy_bandwidth_tb_s(gib: float = 1.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n / statistics.median(times) / 1e12
