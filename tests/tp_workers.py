"""Tensor-parallel ranks for the tests: ``run_ranks`` spawns one process per rank
(torch.multiprocessing), joins them in a process group (gloo on CPU, nccl on CUDA) through a
file in the test's tmp_path, runs a worker below on each and returns each rank's result (a dict
of tensors and strings, saved by the rank and loaded here). A failing rank fails the test with
its traceback; the others are stopped; a rank that waits on a dead peer gives up after
``TIMEOUT_S``.

Workers run in fresh processes: they import only what they need, and everything they get is
picklable (configs, tensors, strings).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def _entry(rank, world_size, backend, out_dir, worker, args):
    device = None
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"file://{out_dir / 'rendezvous'}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
        device_id=device,
    )
    try:
        from engine.parallel import Parallel

        result = worker(Parallel.from_group(), device or torch.device("cpu"), *args)
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free right now on this host (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, tmp_path: Path, *args, world_size: int = 2, backend: str = "gloo"):
    """``worker(parallel, device, *args)`` on ``world_size`` ranks -> each rank's result."""
    out_dir = Path(tmp_path) / f"ranks-{worker.__name__}"
    out_dir.mkdir(parents=True)
    # gloo ranks hold CPU tensors: their kernels run interpreted even on a GPU machine (the
    # spawned processes read the backend from the environment they inherit).
    saved = os.environ.get("FUSIONGUARD_TRITON")
    if backend == "gloo":
        os.environ["FUSIONGUARD_TRITON"] = "interpreted"
    try:
        mp.spawn(_entry, args=(world_size, backend, out_dir, worker, args), nprocs=world_size)
    finally:
        if saved is None:
            os.environ.pop("FUSIONGUARD_TRITON", None)
        else:
            os.environ["FUSIONGUARD_TRITON"] = saved
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def _greedy(model, prompt, steps, *, cuda_graph=False):
    """Greedy generation: tokens [B, steps] and every step's logits [B, steps, V] (fp32)."""
    import engine

    runner = engine.Runner(
        model, max_batch_size=prompt.shape[0], max_seq_len=64, cuda_graph=cuda_graph
    )
    logits = [runner.prefill(prompt.to(model.device)).float()]
    tokens = [logits[-1].argmax(-1)]
    for _ in range(steps - 1):
        logits.append(runner.decode(tokens[-1]).float())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1).cpu(), torch.stack(logits, 1).cpu()


def _drop_all_reduces(model) -> None:
    """A planted bug: every all-reduce returns this rank's partial sum unchanged."""
    for name in ("o_proj_all_reduce", "down_proj_all_reduce"):
        op = model.ops[name]
        tensor = op.writes
        model.ops[name] = dataclasses.replace(op, fn=lambda group, _t=tensor, **kw: kw[_t])
    model._segments.clear()


def generate(parallel, device, config, prompt, steps, runs, dtype=torch.float32, seed=0):
    """For each (name, flags, planted) in ``runs``: this rank's model (random weights, seed)
    with those flags, greedy tokens and logits, the segments it ran, the warnings raised."""
    import engine

    out = {}
    for name, flags, planted in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = engine.build(
                config, dtype=dtype, device=device, seed=seed, flags=flags, parallel=parallel
            )
            if planted:
                _drop_all_reduces(model)
            tokens, logits = _greedy(model, prompt, steps)
        out[name] = {
            "tokens": tokens,
            "logits": logits,
            "flags": ",".join(model.flags.key()),
            "segments": ",".join(s.name for s in model.segments()),
            "not_applicable": ",".join(model.not_applicable),
            "warnings": "\n".join(str(w.message) for w in caught),
        }
    return out


def load_sharded(parallel, device, checkpoint, prompt, steps):
    """This rank's shard of a checkpoint: its logits, its layer-0 weights; and the logits when
    every rank loads rank 0's part (a planted bug: rank 1 then holds rank 0's heads)."""
    import engine
    from engine.parallel import Parallel, load_checkpoint_sharded

    model = engine.build(
        checkpoint=checkpoint, dtype=torch.float32, device=device, flags="none", parallel=parallel
    )
    tokens, logits = _greedy(model, prompt, steps)
    layer = model.model.layers[0]
    weights = {
        "qkv": layer.self_attn.qkv_proj.weight.clone(),
        "o_proj": layer.self_attn.o_proj.weight.clone(),
        "gate_up": layer.mlp.gate_up_proj.weight.clone(),
        "down_proj": layer.mlp.down_proj.weight.clone(),
        "q_norm": layer.self_attn.q_norm.weight.clone(),
    }
    load_checkpoint_sharded(model, checkpoint, layout=Parallel(0, parallel.world_size))
    _, wrong = _greedy(model, prompt, steps)
    return {"tokens": tokens, "logits": logits, "weights": weights, "wrong_part": wrong}


def all_reduce_residual_paths(parallel, device, rows, hidden, dtype=torch.float32):
    """The kernel file's three forms on this rank's partial: the torch reference, the gathered
    float64 reference, and what the fused launcher does here (its result or its error)."""
    from kernels import all_reduce_residual as ar

    g = torch.Generator(device="cpu").manual_seed(1234 + parallel.rank)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    residual = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(7)).to(
        device, dtype
    )
    exact = ar.gathered_float64_reference(x, residual)
    unfused = ar.reference(x.clone(), residual.clone())
    out = {"x": x.cpu(), "residual": residual.cpu(), "exact": exact.cpu(), "unfused": unfused.cpu()}
    reason = ar.unavailable_reason(device)
    out["reason"] = reason or ""
    try:
        out["fused"] = ar.all_reduce_residual(x.clone(), residual.clone()).cpu()
    except RuntimeError as exc:
        out["error"] = str(exc)
    return out


def all_reduce_residual_calls(parallel, device, rounds=6, dtype=torch.bfloat16):
    """GPU: the one-shot kernel called back to back at decode shapes whose grids differ (so
    each block's epoch advances on its own), one rank made late in turn (so the other waits, or
    runs a call ahead), then a CUDA graph of three calls replayed with eager calls between
    (replays alternate the halves they use). Returns every call's result, how far each is
    past its bound around the float64 reference (gathered after the calls), and the blocks'
    epochs against the count of calls each block ran in."""
    from kernels import all_reduce_residual as ar

    reason = ar.unavailable_reason(device)
    if reason is not None:
        return {"reason": reason}
    ws = ar._state[ar._group_key(device, None)]
    start = ws.epochs.clone()
    g = torch.Generator().manual_seed(99 + parallel.rank)
    g_residual = torch.Generator().manual_seed(5)  # the same residual on every rank

    def inputs(shape):
        x = torch.randn(shape, generator=g).to(device, dtype)
        return x, torch.randn(shape, generator=g_residual).to(device, dtype)

    shapes = [(1, 4096), (8, 4096), (1, 1024), (8, 1024), (1, 4096)]
    graph_shapes = [(1, 4096), (8, 4096), (1, 1024)]  # odd: replays alternate the halves
    # Every input made first: between the calls only launches, no host copy syncing a rank.
    eager_inputs = [inputs(shape) for shape in shapes * rounds]
    static = [inputs(shape) for shape in graph_shapes]
    replay_inputs = [
        ([inputs(shape) for shape in graph_shapes], inputs((8, 4096) if k % 2 else (1, 1024)))
        for k in range(4)
    ]
    calls = []  # (x, residual, out)
    for i, (x, residual) in enumerate(eager_inputs):
        if i % 3 == parallel.rank:
            torch.cuda._sleep(20_000)  # ~10 µs late: the peer waits at the barrier
        calls.append((x, residual, ar.all_reduce_residual(x, residual)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outs = [ar.all_reduce_residual(x, r) for x, r in static]
    for k, (graph_inputs, (x, residual)) in enumerate(replay_inputs):
        for (static_x, static_r), (new_x, new_r) in zip(static, graph_inputs, strict=True):
            static_x.copy_(new_x)
            static_r.copy_(new_r)
        if k % 2 == parallel.rank:
            torch.cuda._sleep(20_000)
        graph.replay()
        for (new_x, new_r), out in zip(graph_inputs, graph_outs, strict=True):
            calls.append((new_x, new_r, out.clone()))
        calls.append((x, residual, ar.all_reduce_residual(x, residual)))
    torch.cuda.synchronize()
    ran = torch.zeros_like(start)
    for x, _, _ in calls:
        ran[: ar.launch_shape(x.numel(), x.element_size(), ws.layout).blocks] += 1
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    excess, fused = [], []
    for x, residual, out in calls:
        partials = [torch.empty_like(x) for _ in range(parallel.world_size)]
        dist.all_gather(partials, x)
        exact = ar.float64_reference(partials, residual)
        terms = sum(p.double().abs() for p in partials) + residual.double().abs()
        # One rounding to dtype of a float32 sum: an ulp, plus the float32 sum's own error.
        bound = eps * exact.abs() + 4 * eps32 * terms
        excess.append(((out.double() - exact).abs() - bound).max().item())
        fused.append(out.flatten().cpu())
    return {
        "reason": "",
        "excess": torch.tensor(excess),
        "fused": torch.cat(fused),
        "epochs_advanced": (ws.epochs - start).cpu(),
        "blocks_ran": ran.cpu(),
        "calls": torch.tensor(len(calls)),
    }


def cuda_graph_decode(parallel, device, config, prompt, steps, flags):
    """GPU: this rank's decode eager and replayed from CUDA graphs (NCCL all-reduces captured)."""
    import engine

    model = engine.build(
        config, dtype=torch.bfloat16, device=device, flags=flags, parallel=parallel
    )
    eager_tokens, eager = _greedy(model, prompt, steps)
    graph_tokens, graphed = _greedy(model, prompt, steps, cuda_graph=True)
    return {
        "eager": eager,
        "graphed": graphed,
        "eager_tokens": eager_tokens,
        "tokens": graph_tokens,
    }


def aligned_clocks(parallel, device, late_s):
    """Rank 1 arrives ``late_s`` late; each rank's monotonic clock right after align()."""
    import time

    from profiling.ranks import aligner

    align = aligner(parallel, device)
    if parallel.rank == 1:
        time.sleep(late_s)
    align()
    return {"after": torch.tensor(time.monotonic(), dtype=torch.float64)}
