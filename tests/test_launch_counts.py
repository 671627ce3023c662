"""Launch counts per decoded token: the counter on synthetic traces shaped like the engine's
segments and on real traces captured on a GPU (CPU), and the exact counts of the engine (GPU).
Every expectation comes from the program and the fusion registry: each fused step one kernel
per instance, each unfused op one, and a token saving instances x (unfused - fused) per fusion,
eager and CUDA graph."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

from kernels.markers import mark
from profiling.launches import STEP_RANGE, TraceError, count_launches, profile_decode

DATA = Path(__file__).parent / "data"
INDEX_FILE = DATA / "decode_traces.json"


# --------------------------------------------------------------------------------------------
# A synthetic trace in torch.profiler's chrome-trace format
# --------------------------------------------------------------------------------------------


class TraceBuilder:
    """Writes events the way kineto does: host ranges and API calls on (pid, tid); device
    events on the GPU 'process' some µs later, joined by the correlation id."""

    def __init__(self, pid=100, tid=100):
        self.events: list[dict] = []
        self.t = 1000.0
        self.corr = itertools.count(1)
        self.pid, self.tid = pid, tid
        self.gpu_t = 0.0

    def _x(self, cat, name, ts, dur, pid, tid, **args):
        self.events.append(
            {
                "ph": "X",
                "cat": cat,
                "name": name,
                "pid": pid,
                "tid": tid,
                "ts": ts,
                "dur": dur,
                "args": args,
            }
        )

    def range(self, name):
        builder = self

        class _Range:
            def __enter__(self):
                self.start = builder.t
                builder.t += 1.0
                return self

            def __exit__(self, *exc):
                builder.t += 1.0
                builder._x(
                    "user_annotation",
                    name,
                    self.start,
                    builder.t - self.start,
                    builder.pid,
                    builder.tid,
                )

        return _Range()

    def api(self, name, *, cat="cuda_runtime", tid=None):
        corr = next(self.corr)
        self._x(
            cat, name, self.t, 2.0, self.pid, self.tid if tid is None else tid, correlation=corr
        )
        self.t += 3.0
        return corr

    def device(self, corr, name, cat="kernel", delay=500.0):
        # The GPU runs behind the host: the kernel starts after the range that launched it
        # has closed; only the launch call's time attributes it.
        self.gpu_t = max(self.gpu_t, self.t + delay)
        self._x(cat, name, self.gpu_t, 1.5, 0, 7, correlation=corr, stream=7)
        self.gpu_t += 2.0

    def launch(self, name, *, api="cudaLaunchKernel", cat="cuda_runtime", execute=True):
        corr = self.api(api, cat=cat)
        if execute:
            self.device(corr, name)
        return corr

    def trace(self) -> dict:
        return {"schemaVersion": 1, "traceEvents": self.events}


def _kernel_name(seg) -> str:
    return seg.fusion.kernel_names[0] if seg.fusion is not None else f"{seg.name}_kernel"


def _segments(b: TraceBuilder, segments, *, execute=True, extra: dict | None = None):
    """What the engine does in one forward: every segment a range launching one kernel, in
    ``layer.{i}`` ranges (``extra``: per segment name, kernels planted per instance)."""
    extra = extra or {}
    for layer, group in itertools.groupby(segments, key=lambda seg: seg.layer):
        outer = b.range(f"layer.{layer}") if layer is not None else None
        if outer is not None:
            outer.__enter__()
        for seg in group:
            with b.range(seg.name):
                b.launch(
                    _kernel_name(seg), api="cuLaunchKernelEx", cat="cuda_driver", execute=execute
                )
                for _ in range(extra.get(seg.name, 0)):
                    b.launch("planted_extra", execute=execute)
        if outer is not None:
            outer.__exit__(None, None, None)


def eager_trace(model, steps: int, *, prefill=True, extra=None) -> dict:
    b = TraceBuilder()
    segments = model.segments()
    if prefill:  # the prefill runs the same ranges, outside any decode step: not counted
        _segments(b, segments)
    for _ in range(steps):
        with b.range(STEP_RANGE):
            _segments(b, segments, extra=extra)
            corr = b.api("cudaMemcpyAsync")
            b.device(corr, "Memcpy DtoD (Device -> Device)", cat="gpu_memcpy")
        b.launch("argmax")  # sampling outside the step
    return b.trace()


def graph_trace(model, replays: int, *, report_replays=True) -> dict:
    """The engine's first graph step: eager warm-up, then capture; then replays."""
    b = TraceBuilder()
    segments = model.segments()
    with b.range(STEP_RANGE):
        _segments(b, segments)  # warm-up step, executed
        b.api("cudaStreamBeginCapture_v10000")
        _segments(b, segments, execute=False)  # captured: launch calls, nothing runs
        b.api("cudaStreamEndCapture")
        b.api("cudaGraphInstantiateWithFlags")
    for _ in range(replays):
        with b.range(STEP_RANGE):
            b.device(b.api("cudaMemcpyAsync"), "Memcpy HtoD", cat="gpu_memcpy")
            corr = b.api("cudaGraphLaunch")
            if report_replays:
                for k in range(len(segments)):
                    b.device(corr, f"graph_kernel_{k}")
    return b.trace()


@pytest.fixture(scope="module")
def model():
    from gate_helpers import small_model

    return small_model(layers=3)


def _with_flags(model, spec):
    import engine

    model.flags = engine.FusionFlags.parse(spec)
    return model


def _per_instance(counts_json: dict) -> dict:
    return {n: {"per_instance": r["per_instance"]} for n, r in counts_json["ranges"].items()}


def _expected(model, spec) -> dict[str, tuple[int, int]]:
    """From the program and the registry, not from a count: per segment name, (instances
    per step, kernels per instance)."""
    _with_flags(model, spec)
    out: dict[str, list[int]] = {}
    for seg in model.segments():
        kernels = seg.fusion.fused_kernels if seg.fusion is not None else seg.ops[0].op.kernels
        out.setdefault(seg.name, []).append(kernels)
    return {name: (len(k), k[0]) for name, k in out.items()}


# --------------------------------------------------------------------------------------------
# CPU: the counter on synthetic traces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("spec", ["default", "none", "o_proj_residual,add_rms_norm"])
def test_every_segment_counted_as_the_program_says(model, spec, graph):
    from profiling.measure import segment_names

    steps = 3
    _with_flags(model, spec)
    trace = graph_trace(model, steps) if graph else eager_trace(model, steps)
    counts = count_launches(trace, ranges=segment_names(model))
    assert counts.mode == ("graph" if graph else "eager")
    assert counts.num_steps == steps and counts.uniform
    expected = _expected(model, spec)
    for name, (instances, per_instance) in expected.items():
        assert counts.range_instances(name) == [per_instance] * (instances * steps), name
    assert counts.kernels_per_step == sum(n * k for n, k in expected.values())
    assert counts.memcpy_per_step == 1
    if graph:
        assert counts.replay_matches


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_fusions_save_exactly_what_the_registry_says(model, graph):
    from profiling.gate import expected_saving
    from profiling.measure import model_summary, segment_names

    def counted(spec):
        _with_flags(model, spec)
        trace = graph_trace(model, 2) if graph else eager_trace(model, 2)
        return count_launches(trace, ranges=segment_names(model)).to_json()

    info = model_summary(model)
    none = counted("none")
    for spec in ("default", "o_proj_residual", "add_rms_norm,norm_gate_up_silu"):
        fusions = _with_flags(model, spec).flags.enabled
        saved = none["kernels_per_step"] - counted(spec)["kernels_per_step"]
        assert saved == expected_saving(info, fusions, _per_instance(none)), spec
    layers = model.config.num_hidden_layers
    # Each op one kernel here: 2 kernels -> 1 and 3 -> 1 per layer.
    assert expected_saving(info, ["o_proj_residual"], _per_instance(none)) == layers
    assert expected_saving(info, ["norm_gate_up_silu"], _per_instance(none)) == 2 * layers


def test_planted_extra_kernel_in_a_step_is_counted(model):
    from profiling.measure import segment_names

    _with_flags(model, "default")
    names = segment_names(model)
    base = count_launches(eager_trace(model, 2), ranges=names)
    planted = count_launches(eager_trace(model, 2, extra={"o_proj_residual": 1}), ranges=names)
    layers = model.config.num_hidden_layers
    assert planted.range_per_instance("o_proj_residual") == 2
    assert planted.kernels_per_step == base.kernels_per_step + layers


def test_prefill_and_sampling_outside_decode_steps_are_not_counted(model):
    from profiling.measure import segment_names

    _with_flags(model, "none")
    names = segment_names(model)
    with_prefill = count_launches(eager_trace(model, 2, prefill=True), ranges=names)
    without = count_launches(eager_trace(model, 2, prefill=False), ranges=names)
    assert with_prefill.to_json() == without.to_json()


def test_launch_on_another_thread_is_not_attributed_to_the_range():
    b = TraceBuilder()
    with b.range(STEP_RANGE), b.range("o_proj_residual"):
        b.launch("ours")
        corr = b.api("cudaLaunchKernel", tid=999)  # same time, other thread
        b.device(corr, "theirs")
    counts = count_launches(b.trace(), ranges=["o_proj_residual"])
    assert counts.range_instances("o_proj_residual") == [1]
    assert counts.kernels_per_step == 1
    assert counts.range_kernel_names["o_proj_residual"] == {"ours": 1}


def test_memcpy_and_memset_are_listed_apart_from_kernels():
    b = TraceBuilder()
    with b.range(STEP_RANGE):
        b.launch("k")
        b.device(b.api("cudaMemsetAsync"), "Memset (Device)", cat="gpu_memset")
        b.device(b.api("cudaMemcpyAsync_ptsz"), "Memcpy DtoD", cat="gpu_memcpy")
        b.device(b.api("cudaMemcpyAsync"), "Memcpy HtoD", cat="gpu_memcpy")
    counts = count_launches(b.trace())
    assert (counts.kernels_per_step, counts.memcpy_per_step, counts.memset_per_step) == (1, 2, 1)


def test_older_spellings_of_categories_and_api_names():
    b = TraceBuilder()
    with b.range(STEP_RANGE):
        b.launch("k", api="cudaLaunchKernel_v7000")
        b.launch("k", api="cudaLaunchKernelExC_v11060")
    trace = b.trace()
    for e in trace["traceEvents"]:
        e["cat"] = {"kernel": "Kernel", "cuda_runtime": "Runtime"}.get(e["cat"], e["cat"])
    assert count_launches(trace).kernels_per_step == 2


def test_lost_kernel_events_raise_instead_of_undercounting():
    b = TraceBuilder()
    with b.range(STEP_RANGE):
        b.launch("seen")
        b.launch("lost", execute=False)
    with pytest.raises(TraceError, match="lost"):
        count_launches(b.trace())
    assert count_launches(b.trace(), strict=False).kernels_per_step == 1


def test_graph_counts_from_capture_when_replays_are_not_reported(model):
    _with_flags(model, "default")
    counts = count_launches(graph_trace(model, 2, report_replays=False), ranges=["o_proj_residual"])
    assert counts.mode == "graph"
    assert counts.replay_kernels_seen is None and counts.replay_matches is None
    assert counts.range_instances("o_proj_residual") == [1] * (2 * model.config.num_hidden_layers)
    assert counts.kernels_per_step == len(model.segments())


def test_graph_replay_that_disagrees_with_the_capture_is_visible(model):
    _with_flags(model, "default")
    trace = graph_trace(model, 2)
    # Drop one kernel of the last replay: the cross-check must notice.
    kernels = [e for e in trace["traceEvents"] if e["name"].startswith("graph_kernel")]
    trace["traceEvents"].remove(kernels[-1])
    counts = count_launches(trace)
    assert counts.replay_matches is False


def test_graph_replays_without_capture_are_an_error(model):
    _with_flags(model, "default")
    trace = graph_trace(model, 2)
    trace["traceEvents"] = [e for e in trace["traceEvents"] if "Capture" not in e["name"]]
    with pytest.raises(TraceError, match="captured before profiling"):
        count_launches(trace)


def test_trace_without_decode_steps_names_the_missing_range():
    b = TraceBuilder()
    with b.range("something_else"):
        b.launch("k")
    with pytest.raises(TraceError, match="no 'decode_step' ranges.*something_else"):
        count_launches(b.trace())


def test_cpu_profiler_trace_has_no_cuda_events(tmp_path):
    """A real trace from this machine's profiler (no GPU): a clear error, not zero counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, mark(STEP_RANGE), mark("o_proj"):
        torch.randn(8, 8) @ torch.randn(8, 8)
    path = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(path))
    with pytest.raises(TraceError, match="no CUDA kernel"):
        count_launches(path)


def test_files_gz_and_bad_inputs(model, tmp_path):
    trace = eager_trace(_with_flags(model, "default"), 2)
    plain, packed = tmp_path / "t.json", tmp_path / "t.json.gz"
    plain.write_text(json.dumps(trace))
    with gzip.open(packed, "wt") as f:
        json.dump(trace, f)
    assert count_launches(plain).to_json() == count_launches(packed).to_json()
    with pytest.raises(TraceError, match="does not exist"):
        count_launches(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TraceError, match="not a"):
        count_launches(tmp_path / "bad.json")
    with pytest.raises(TraceError, match="traceEvents"):
        count_launches({"events": []})


# --------------------------------------------------------------------------------------------
# CPU: the counter on real traces captured on a GPU (python -m scripts.capture_traces)
# --------------------------------------------------------------------------------------------


def _real_traces() -> dict:
    if not INDEX_FILE.exists():
        pytest.skip(
            "no GPU traces committed: on a GPU run `python -m scripts.capture_traces --out "
            "tests/data` and commit tests/data/"
        )
    return json.loads(INDEX_FILE.read_text())


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_counter_on_real_gpu_traces(mode):
    """Expectations from the config the GPU run used and the registry, not from its counts."""
    import engine
    from engine.config import default_config
    from profiling.gate import expected_saving
    from profiling.measure import model_summary, segment_names

    index = _real_traces()
    from engine.qwen3 import Qwen3ForCausalLM

    with torch.device("meta"):  # the program's structure only: no weights
        model = Qwen3ForCausalLM(
            default_config().replace(num_hidden_layers=index["num_hidden_layers"])
        )
    counts = {}
    for name, meta in index["traces"].items():
        if meta["mode"] != mode:
            continue
        model.flags = engine.FusionFlags(meta["fusions"])
        c = count_launches(DATA / name, ranges=segment_names(model))
        assert c.mode == mode and c.uniform and c.num_steps == index["steps"]
        for seg_name, (instances, per_instance) in _expected(
            model, ",".join(meta["fusions"]) or "none"
        ).items():
            got = c.range_instances(seg_name)
            assert len(got) == instances * index["steps"], (name, seg_name)
            assert len(set(got)) == 1, (name, seg_name)  # every instance the same
            if seg_name in {f.name for f in model.flags.fusions()}:
                assert set(got) == {per_instance}, (name, seg_name)  # one fused kernel
        if mode == "eager":
            for f in model.flags.fusions():
                assert set(c.range_kernel_names[f.name]) <= set(f.kernel_names), f.name
        else:
            assert c.replay_matches in (True, None)
        counts[meta["variant"]] = (c, meta["fusions"])
    (default, fusions), (none, _) = counts["default"], counts["none"]
    saved = none.kernels_per_step - default.kernels_per_step
    assert saved == expected_saving(model_summary(model), fusions, _per_instance(none.to_json()))


# --------------------------------------------------------------------------------------------
# GPU: exact counts of the engine
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[24, None], ids=["24-layers", "default-28"])
def layered_model(request):
    import engine
    from engine.config import default_config

    config = default_config()
    if request.param is not None:
        config = config.replace(num_hidden_layers=request.param)
    return engine.build(config, seed=0)


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_engine_launch_counts_are_exact(layered_model, graph):
    import engine
    from engine.runner import Runner
    from profiling.gate import expected_saving
    from profiling.measure import model_summary, segment_names

    model, steps = layered_model, 3
    info = model_summary(model)
    totals = {}
    for spec in ("none", "default", "o_proj_residual,add_rms_norm,norm_gate_up_silu"):
        model.flags = engine.FusionFlags.parse(spec)
        runner = Runner(model, max_seq_len=32, cuda_graph=graph)
        counts = profile_decode(runner, steps, ranges=segment_names(model))
        assert counts.uniform
        fused = {f.name for f in model.flags.fusions()}
        for name, (instances, per_instance) in _expected(model, spec).items():
            got = counts.range_instances(name)
            assert len(got) == instances * steps and len(set(got)) == 1, name
            if name in fused:
                assert set(got) == {per_instance}, name  # one fused kernel per instance
        if graph:
            assert counts.replay_matches in (True, None)
        totals[spec] = (counts.to_json(), model.flags.enabled)
        print(f"\n{model.config.num_hidden_layers} layers, {spec}: {counts.kernels_per_step:g}")
    none = totals["none"][0]
    for spec, (counted, fusions) in totals.items():
        saved = none["kernels_per_step"] - counted["kernels_per_step"]
        assert saved == expected_saving(info, fusions, _per_instance(none)), spec
    model.flags = engine.FusionFlags.default()


# --------------------------------------------------------------------------------------------
# CPU: what each fused step dispatches (the interpreter's proxy for its kernel count)
# --------------------------------------------------------------------------------------------

# aten ops that only allocate or re-view memory: no kernel on a GPU. Anything else a fused
# step dispatches outside its Triton kernel (an add, a copy, a zeros fill, a GEMM) would be a
# kernel of its own there.
NO_KERNEL_OPS = {
    "empty.memory_format", "empty_strided.default", "new_empty.default",
    "new_empty_strided.default", "empty_like.default", "view.default", "_unsafe_view.default",
    "as_strided.default", "t.default", "transpose.int", "permute.default", "expand.default",
    "unsqueeze.default", "squeeze.dim", "slice.Tensor", "select.int", "detach.default",
    "alias.default", "split.Tensor", "unbind.int",
}  # fmt: skip


def _kernels_dispatched(call) -> tuple[list[str], list[str]]:
    """(Triton kernels launched, kernel-launching aten ops) while ``call()`` runs through the
    Triton interpreter. The interpreter's own copies in and out of its kernels are not the
    step's: dispatch is not watched while a Triton kernel runs."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
    from triton.runtime.interpreter import InterpretedFunction

    launched: list[str] = []
    ops: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func).removeprefix("aten.")
            if name not in NO_KERNEL_OPS:
                ops.append(name)
            return func(*args, **(kwargs or {}))

    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    InterpretedFunction.run = counted_run
    try:
        with Watch():
            call()
    finally:
        InterpretedFunction.run = run
    return launched, ops


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("fusion", [f.name for f in __import__("engine").fusions.all_fusions()])
def test_each_fused_step_dispatches_one_kernel(fusion, rows):
    """The engine's fused callable of every registered fusion: one Triton kernel and nothing
    else that would launch on a GPU (after a first call, which may allocate its workspace).
    On a GPU, test_engine_launch_counts_are_exact counts the real kernels."""
    from engine import fusions as registry
    from engine.config import small_config
    from engine.program import call_fused, draw_inputs, span_ops
    from engine.qwen3 import Qwen3ForCausalLM
    from kernels.runtime import INTERPRETING

    if not INTERPRETING:
        pytest.skip("counts the interpreter's launches; on a GPU the profiler counts kernels")
    config = small_config()
    with torch.device("meta"):
        program = Qwen3ForCausalLM(config).program()
    f = registry.get(fusion)
    ops = span_ops(program, f)
    generator = torch.Generator().manual_seed(rows)
    inputs = draw_inputs(ops, config, rows, torch.float32, "cpu", generator)
    call_fused(f, ops, inputs)  # first call: may allocate and zero a workspace, once
    launched, aten = _kernels_dispatched(lambda: call_fused(f, ops, inputs))
    assert len(launched) + len(aten) == 1, (
        f"{fusion} at {rows} row(s) dispatched Triton kernels {launched} and kernel-launching "
        f"aten ops {aten}: a fused step is one kernel"
    )
