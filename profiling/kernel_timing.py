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
  of the per-round ratios. The rounds scatter by a few tenths of a percent, and the median's
  spread across processes is about what that scatter predicts for the number of rounds
  (docs/definitions.md, "Kernel timing").

An op the decode step runs alone (no enabled fusion spans it: attention, q/k norm + RoPE, the
embedding, the final norm, lm_head) is timed the same way against a copy of the bytes it must
move (``time_step_op``): its inputs are the ones each of its places in the model received in
a real decode step, so attention reads a live KV cache; the copy is the reference that moves
with the GPU. The timed step is under the key "fused" in both cases.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.config import QWEN3_SIZES
from engine.program import (
    Fusion,
    bytes_moved,
    call_fused,
    draw_inputs,
    external_reads,
    run_ops,
    run_unfused,
    span_ops,
)
from profiling.ranks import aligner

LAYERS = 28
REFERENCE_UNFUSED = "unfused"
REFERENCE_COPY = "copy"
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


def compiled_span(ops) -> Callable[[dict], Any]:
    """torch.compile of the span's torch formulas (each op's ``fn64``, run in the inputs'
    dtype), as ``call(inputs)``: what the compiler makes of the same ops, out of place. The
    kernel benchmark's ``torch_compile`` peer; not in the gate (compiling takes seconds per
    shape). A fresh compiled function per call of this, so shapes never share a cache."""

    def span(**inputs):
        return run_ops(ops, inputs, lambda op: op.fn64)[ops[-1].writes]

    compiled = torch.compile(span, dynamic=False, fullgraph=True)
    reads = [r.name for r in external_reads(ops)]
    return lambda inputs: compiled(**{name: inputs[name] for name in reads})


def fused_path(fusion: Fusion, inputs: dict, rows: int) -> str:
    """Which path the fused call takes for ``inputs`` at ``rows`` tokens: "gemv" or "cublas"
    (the kernel's own choice: a forced config, this GPU's tuned table, else its heuristic), or
    "triton" for kernels with one path (no ``select_config``). A two-path kernel's table is
    keyed by its weight's rows over its ``ROWS_PER_OUTPUT`` (kernels/gemv.py)."""
    kernel = fusion.kernel_module()
    if not hasattr(kernel, "select_config"):
        return "triton"
    (weight,) = [v for k, v in inputs.items() if k.endswith("_weight") and v.dim() == 2]
    N, K = weight.shape[0] // kernel.ROWS_PER_OUTPUT, weight.shape[1]
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


def time_rank_fusion(
    fusion: Fusion,
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
    """A fusion that needs every rank (``Fusion.needs_ranks``), timed on every rank of
    ``parallel``: its kernel against its unfused ops (NCCL all-reduce in place, then the
    residual add), at ``rows`` x ``hidden``. None where the kernel cannot run (its
    ``unavailable_reason``; a collective)."""
    kernel = fusion.kernel_module()
    launch = getattr(kernel, fusion.kernel)
    device = torch.device("cuda", torch.cuda.current_device())
    group = parallel.group
    if kernel.unavailable_reason(device, group) is not None:
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
        "fused": lambda i: launch(i["x"], i["residual"], group, out=i["residual"]),
        REFERENCE_UNFUSED: lambda i: kernel.reference(i["x"], i["residual"], group),
    }
    align = aligner(parallel, device)  # every rank starts each timed chain together
    us = time_chains(impls, input_sets, reps=reps, rounds=rounds, replays=replays, align=align)
    return RatioResult(fusion.name, rows, us)


def step_op_names(model) -> list[str]:
    """The ops the model's decode step runs alone under its flags (no enabled fusion spans
    them), once each, in program order."""
    return list(dict.fromkeys(s.name for s in model.segments() if s.fusion is None))


def step_op_inputs(model, rows: int, context_len: int, seed: int = 0) -> dict[str, list[dict]]:
    """For every op the step runs alone, the inputs each of its places in the program receives
    in one decode step of ``rows`` sequences after a random prompt of ``context_len`` tokens:
    one dict per layer (one for an op outside the layers). Builds a Runner over ``model`` (its
    KV cache replaces the model's)."""
    from engine.qwen3 import StepContext
    from engine.runner import Runner

    device = model.device
    runner = Runner(model, max_batch_size=rows, max_seq_len=context_len + 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.vocab_size
    runner.prefill(torch.randint(vocab, (rows, context_len), device=device, generator=generator))
    ctx = StepContext(rows, 1, runner.positions[:rows], False, model.rope_cos, model.rope_sin)
    state = {"ids": torch.randint(vocab, (rows,), device=device, generator=generator), "ctx": ctx}
    recorded: dict[str, list[dict]] = {}
    with torch.no_grad():
        for segment in model.segments():
            if segment.fusion is None:
                inputs = {name: get(state) for name, get in segment.inputs}
                recorded.setdefault(segment.name, []).append(inputs)
            segment.run(state)
    return recorded


def time_step_op(
    model,
    name: str,
    input_sets: Sequence[dict],
    rows: int,
    context_len: int,
    *,
    calls: int = 4 * LAYERS,
    rounds: int = 11,
    replays: int = 3,
) -> RatioResult:
    """Op ``name`` on each of ``input_sets`` (step_op_inputs') against a device copy of the
    bytes it must move, interleaved round by round; about ``calls`` calls per replay, whatever
    the number of places (an op outside the layers has one)."""
    op = model.ops[name]
    itemsize = torch.finfo(model.dtype).bits // 8
    moved = bytes_moved([op], [op.writes], model.config, rows, itemsize, context_len + 1)
    # A copy of n bytes moves 2n (read + write); each place gets its own buffers, as each
    # layer has its own weights and cache.
    n = max(1, moved // 2)
    sets = [
        {
            "inputs": inputs,
            "src": torch.randint(256, (n,), dtype=torch.uint8, device=model.device),
            "dst": torch.empty(n, dtype=torch.uint8, device=model.device),
        }
        for inputs in input_sets
    ]
    impls = {
        "fused": lambda s: op.fn(**s["inputs"]),
        REFERENCE_COPY: lambda s: s["dst"].copy_(s["src"]),
    }
    reps = max(1, math.ceil(calls / len(sets)))
    with torch.no_grad():
        us = time_chains(impls, sets, reps=reps, rounds=rounds, replays=replays)
    return RatioResult(name, rows, us, path="op")


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
