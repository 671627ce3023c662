"""Launch counts per decoded token (D3): the counter, on synthetic and real traces (CPU), and
the exact counts of the engine (GPU): o_proj_residual 2 kernels per layer unfused, 1 fused,
and a whole token differing by exactly L = num_hidden_layers, eager and CUDA graph."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch

from profiling.launches import (
    O_PROJ_RANGE,
    STEP_RANGE,
    TraceError,
    count_launches,
    profile_decode,
)
from profiling.markers import mark

DATA = Path(__file__).parent / "data"
COUNTS_FILE = DATA / "decode_trace_counts.json"
OTHER_KERNELS_PER_LAYER = 3  # synthetic: norm, GEMM, attention around the step


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


def _layer(b: TraceBuilder, i: int, fused: bool, execute=True, extra_in_step=0):
    with b.range(f"layer.{i}"):
        for k in range(OTHER_KERNELS_PER_LAYER):
            b.launch(f"other_{k}", execute=execute)
        with b.range(O_PROJ_RANGE):
            if fused:
                b.launch(
                    "_gemv_residual_kernel",
                    api="cuLaunchKernelEx",
                    cat="cuda_driver",
                    execute=execute,
                )
            else:
                b.launch("nvjet_gemm", api="cuLaunchKernelEx", cat="cuda_driver", execute=execute)
                b.launch("vectorized_elementwise_kernel<CUDAFunctor_add>", execute=execute)
            for _ in range(extra_in_step):
                b.launch("planted_extra", execute=execute)


def eager_trace(layers: int, steps: int, fused: bool, *, prefill=True, extra_in_step=0) -> dict:
    b = TraceBuilder()
    if prefill:  # prefill o_proj ranges, outside any decode step: must not be counted
        for i in range(layers):
            _layer(b, i, fused)
    for _ in range(steps):
        with b.range(STEP_RANGE):
            for i in range(layers):
                _layer(b, i, fused, extra_in_step=extra_in_step)
            corr = b.api("cudaMemcpyAsync")
            b.device(corr, "Memcpy DtoD (Device -> Device)", cat="gpu_memcpy")
        b.launch("argmax")  # sampling outside the step
    return b.trace()


def graph_trace(layers: int, replays: int, fused: bool, *, report_replays=True) -> dict:
    """The engine's first graph step: eager warm-up, then capture; then replays."""
    b = TraceBuilder()
    with b.range(STEP_RANGE):
        for i in range(layers):  # warm-up step, executed
            _layer(b, i, fused)
        b.api("cudaStreamBeginCapture_v10000")
        for i in range(layers):  # captured: launch calls, nothing runs
            _layer(b, i, fused, execute=False)
        b.api("cudaStreamEndCapture")
        b.api("cudaGraphInstantiateWithFlags")
    held = layers * (OTHER_KERNELS_PER_LAYER + (1 if fused else 2))
    for _ in range(replays):
        with b.range(STEP_RANGE):
            b.device(b.api("cudaMemcpyAsync"), "Memcpy HtoD", cat="gpu_memcpy")
            corr = b.api("cudaGraphLaunch")
            if report_replays:
                for k in range(held):
                    b.device(corr, f"graph_kernel_{k}")
    return b.trace()


# --------------------------------------------------------------------------------------------
# CPU: the counter on synthetic traces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [2, 5])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_fused_takes_one_kernel_per_layer_and_token_differs_by_layers(layers, graph):
    steps = 3
    make = graph_trace if graph else eager_trace
    fused = count_launches(make(layers, steps, True))
    unfused = count_launches(make(layers, steps, False))
    for counts in (fused, unfused):
        assert counts.mode == ("graph" if graph else "eager")
        assert counts.num_steps == steps
        assert counts.uniform
        assert len(counts.range_instances()) == layers * steps
    assert fused.range_instances() == [1] * (layers * steps)
    assert unfused.range_instances() == [2] * (layers * steps)
    assert unfused.kernels_per_step - fused.kernels_per_step == layers
    assert fused.kernels_per_step == layers * (OTHER_KERNELS_PER_LAYER + 1)
    assert fused.memcpy_per_step == unfused.memcpy_per_step == 1
    if graph:
        assert fused.replay_matches and unfused.replay_matches


def test_planted_extra_kernel_in_the_step_is_counted():
    base = count_launches(eager_trace(4, 2, True))
    planted = count_launches(eager_trace(4, 2, True, extra_in_step=1))
    assert planted.range_per_instance() == base.range_per_instance() + 1
    assert planted.kernels_per_step == base.kernels_per_step + 4


def test_prefill_and_sampling_outside_decode_steps_are_not_counted():
    with_prefill = count_launches(eager_trace(3, 2, False, prefill=True))
    without = count_launches(eager_trace(3, 2, False, prefill=False))
    assert with_prefill.to_json() == without.to_json()


def test_launch_on_another_thread_is_not_attributed_to_the_range():
    b = TraceBuilder()
    with b.range(STEP_RANGE), b.range(O_PROJ_RANGE):
        b.launch("ours")
        corr = b.api("cudaLaunchKernel", tid=999)  # same time, other thread
        b.device(corr, "theirs")
    counts = count_launches(b.trace())
    assert counts.range_instances() == [1]
    assert counts.kernels_per_step == 1
    assert counts.range_kernel_names[O_PROJ_RANGE] == {"ours": 1}


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


def test_graph_counts_from_capture_when_replays_are_not_reported():
    counts = count_launches(graph_trace(3, 2, True, report_replays=False))
    assert counts.mode == "graph"
    assert counts.replay_kernels_seen is None and counts.replay_matches is None
    assert counts.range_instances() == [1] * 6
    assert counts.kernels_per_step == 3 * (OTHER_KERNELS_PER_LAYER + 1)


def test_graph_replay_that_disagrees_with_the_capture_is_visible():
    trace = graph_trace(2, 2, True)
    # Drop one kernel of the last replay: the cross-check must notice.
    kernels = [e for e in trace["traceEvents"] if e["name"].startswith("graph_kernel")]
    trace["traceEvents"].remove(kernels[-1])
    counts = count_launches(trace)
    assert counts.replay_matches is False


def test_graph_replays_without_capture_are_an_error():
    trace = graph_trace(2, 2, True)
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

    with profile(activities=[ProfilerActivity.CPU]) as prof, mark(STEP_RANGE), mark(O_PROJ_RANGE):
        torch.randn(8, 8) @ torch.randn(8, 8)
    path = tmp_path / "cpu.json"
    prof.export_chrome_trace(str(path))
    with pytest.raises(TraceError, match="no CUDA kernel"):
        count_launches(path)


def test_files_gz_and_bad_inputs(tmp_path):
    trace = eager_trace(2, 2, True)
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
# CPU: the counter on real traces captured on a GPU (scripts/gpu_capture_trace.py)
# --------------------------------------------------------------------------------------------


def _real_trace(name: str) -> Path:
    path = DATA / f"{name}.json.gz"
    if not path.exists() or not COUNTS_FILE.exists():
        pytest.skip(
            f"{path.name} not committed yet: on a GPU run "
            "`python scripts/gpu_capture_trace.py --out tests/data` and commit tests/data/"
        )
    return path


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_counter_on_real_gpu_traces(mode):
    fused_path = _real_trace(f"decode_trace_{mode}_fused")
    unfused_path = _real_trace(f"decode_trace_{mode}_unfused")
    recorded = json.loads(COUNTS_FILE.read_text())
    layers = recorded["num_hidden_layers"]  # from the config the GPU run used
    fused, unfused = count_launches(fused_path), count_launches(unfused_path)
    for counts in (fused, unfused):
        assert counts.mode == mode
        assert counts.num_steps == recorded["steps"]
        assert counts.uniform
    assert fused.range_instances() == [1] * (layers * recorded["steps"])
    assert unfused.range_instances() == [2] * (layers * recorded["steps"])
    assert unfused.kernels_per_step - fused.kernels_per_step == layers
    if mode == "eager":
        names = fused.range_kernel_names[O_PROJ_RANGE]
        assert set(names) <= {"_gemv_residual_kernel", "_gemm_residual_kernel"}, names
        assert any("add" in n.lower() for n in unfused.range_kernel_names[O_PROJ_RANGE])
    else:
        assert fused.replay_matches in (True, None) and unfused.replay_matches in (True, None)
    # This machine's torch reads the trace as the GPU machine's did.
    assert fused.to_json() == recorded["traces"][fused_path.name]
    assert unfused.to_json() == recorded["traces"][unfused_path.name]


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
    from engine.runner import Runner
    from profiling.throughput import fusion

    layers = layered_model.config.num_hidden_layers
    steps = 3
    counts = {}
    for fused in (True, False):
        with fusion(layered_model, fused):
            runner = Runner(layered_model, max_seq_len=32, cuda_graph=graph)
            counts[fused] = profile_decode(runner, steps)
    fused, unfused = counts[True], counts[False]
    print(
        f"\n{layers} layers, {'graph' if graph else 'eager'}: "
        f"{unfused.kernels_per_step:g} -> {fused.kernels_per_step:g} kernels/token, "
        f"o_proj_residual {unfused.range_per_step():g} -> {fused.range_per_step():g}, "
        f"replays seen {unfused.replay_kernels_seen} / {fused.replay_kernels_seen}"
    )
    for c in (fused, unfused):
        assert c.mode == ("graph" if graph else "eager")
        assert c.uniform
    assert fused.range_instances() == [1] * (layers * steps)
    assert unfused.range_instances() == [2] * (layers * steps)
    assert unfused.range_per_step() == 2 * layers and fused.range_per_step() == layers
    assert unfused.kernels_per_step - fused.kernels_per_step == layers
    if graph:
        assert fused.replay_matches in (True, None) and unfused.replay_matches in (True, None)
