"""CUDA kernel launches per decoded token, attributed to marked steps (docs/definitions.md,
"Launch counts"), and the GPU time of each marked step (the time breakdown).

Counting works on the chrome trace that ``torch.profiler`` exports, so the same code runs on a
GPU run and, in CPU CI, on a trace committed from one (tests/data/). In that trace:

- device events: ``cat`` "kernel", "gpu_memcpy", "gpu_memset" (memcpy/memset are counted
  apart from kernels), each with ``args.correlation``;
- the host call that put it on the GPU: ``cat`` "cuda_runtime" (``cudaLaunchKernel``,
  ``cudaGraphLaunch``, ``cudaMemcpyAsync``...) or "cuda_driver" (``cuLaunchKernel``,
  ``cuLaunchKernelEx``: Triton and cuBLAS launch through the driver API), same correlation id;
- the marked steps: ``cat`` "user_annotation" ranges (``record_function``, see
  kernels/markers.py) on the host thread.

A kernel belongs to every marked range that contains (same pid/tid, by start time) the host
call that launched it. Only ranges inside a ``decode_step`` range count, so the prefill's
ranges never leak into per-token numbers. One decode step decodes one token per sequence: at
batch 1, "per step" is "per token". The engine marks every segment it runs with the name of
the fusion or op (engine/program.py), so each fusion step and each unfused op is a range.

CUDA-graph mode. Profiling graph replays is unreliable with some CUPTI versions (kernels of a
replay missing, or reported without a usable correlation), so the primary count is what the
graph HOLDS: the profile must include the capture itself. Between ``cudaStreamBeginCapture`` and
``cudaStreamEndCapture`` every launch call is recorded by the profiler but nothing runs; each
launch call inside that window is one kernel node of the graph, and the marked ranges inside
the window (``layer.{i}``, ``o_proj_residual``) attribute them exactly as in eager mode. Launch
calls a replay step makes outside the graph (e.g. an input copy) are added from the replay
steps. As a cross-check, ``replay_kernels_seen`` holds, per replayed ``decode_step``, the kernels
the profiler reported as executed there (kernels of a graph carry the correlation id of their
``cudaGraphLaunch``); where CUPTI reports them they must equal the captured count.

The trace formats of torch 2.11 (GPU machine) and 2.13 are the same in what is used here;
category names are matched case-insensitively and API names with their ``_v<N>``/``_ptsz``
suffixes stripped, which also covers older kineto spellings ("Kernel", "Runtime", "Memcpy").
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import gzip
import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STEP_RANGE = "decode_step"

_KERNEL_CATS = {"kernel"}
_MEMCPY_CATS = {"gpu_memcpy", "memcpy"}
_MEMSET_CATS = {"gpu_memset", "memset"}
_API_CATS = {"cuda_runtime", "cuda_driver", "runtime", "driver"}
_RANGE_CATS = {"user_annotation"}

# Host calls that put exactly one kernel on a stream (or, while capturing, into a graph).
KERNEL_LAUNCH_APIS = frozenset(
    {
        "cudaLaunchKernel",
        "cudaLaunchKernelExC",
        "cudaLaunchCooperativeKernel",
        "cudaLaunchCooperativeKernelMultiDevice",
        "cuLaunchKernel",
        "cuLaunchKernelEx",
        "cuLaunchCooperativeKernel",
    }
)
GRAPH_LAUNCH_APIS = frozenset({"cudaGraphLaunch", "cuGraphLaunch"})
_MEMCPY_API = re.compile(r"^cu(da)?Memcpy")
_MEMSET_API = re.compile(r"^cu(da)?Memset")
_CAPTURE_BEGIN = re.compile(r"^cu(da)?StreamBeginCapture")
_CAPTURE_END = re.compile(r"^cu(da)?StreamEndCapture")
_API_SUFFIX = re.compile(r"(_v\d+)?(_ptsz|_ptds)?$")


class TraceError(ValueError):
    """The trace cannot give launch counts (no CUDA events, no marked steps, ...)."""


# --------------------------------------------------------------------------------------------
# Reading the trace
# --------------------------------------------------------------------------------------------


def load_trace(source: str | Path | dict) -> dict:
    """A chrome trace as a dict, from a dict, a .json file or a .json.gz file."""
    if isinstance(source, dict):
        trace = source
    else:
        path = Path(source)
        if not path.is_file():
            raise TraceError(f"trace file {path} does not exist")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                trace = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceError(
                f"trace file {path} is not a (gzipped) JSON chrome trace: {exc}"
            ) from exc
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise TraceError("trace has no 'traceEvents' list: not a torch.profiler chrome trace")
    return trace


@dataclasses.dataclass(frozen=True)
class Event:
    """One complete ("ph": "X") event, times in µs."""

    name: str
    cat: str
    pid: Any
    tid: Any
    ts: float
    end: float
    correlation: int | None = None

    @property
    def thread(self) -> tuple:
        return (self.pid, self.tid)


def api_name(name: str) -> str:
    """``cudaLaunchKernel_v7000`` / ``cudaMemcpyAsync_ptsz`` -> the plain API name."""
    return _API_SUFFIX.sub("", name, count=1)


@dataclasses.dataclass
class ParsedTrace:
    ranges: list[Event]  # marked steps (user_annotation) on host threads
    api_calls: list[Event]  # CUDA runtime/driver calls on host threads
    kernels: list[Event]
    memcpys: list[Event]
    memsets: list[Event]

    @classmethod
    def from_trace(cls, trace: dict) -> ParsedTrace:
        parsed = cls([], [], [], [], [])
        buckets = (
            (_RANGE_CATS, parsed.ranges),
            (_API_CATS, parsed.api_calls),
            (_KERNEL_CATS, parsed.kernels),
            (_MEMCPY_CATS, parsed.memcpys),
            (_MEMSET_CATS, parsed.memsets),
        )
        for raw in trace["traceEvents"]:
            if not isinstance(raw, dict) or raw.get("ph") != "X":
                continue
            cat = str(raw.get("cat", "")).lower()
            target = next((events for cats, events in buckets if cat in cats), None)
            if target is None:
                continue
            try:
                ts = float(raw["ts"])
                dur = float(raw.get("dur", 0.0))
            except (KeyError, TypeError, ValueError):
                continue  # malformed event: no usable time
            args = raw.get("args") or {}
            corr = args.get("correlation")
            target.append(
                Event(
                    name=str(raw.get("name", "")),
                    cat=cat,
                    pid=raw.get("pid"),
                    tid=raw.get("tid"),
                    ts=ts,
                    end=ts + dur,
                    correlation=int(corr) if isinstance(corr, (int, float)) else None,
                )
            )
        for events in (parsed.ranges, parsed.api_calls):
            events.sort(key=lambda e: e.ts)
        return parsed

    @property
    def has_cuda(self) -> bool:
        return bool(self.kernels or self.memcpys or self.memsets or self.launch_calls())

    def launch_calls(self) -> list[Event]:
        return [e for e in self.api_calls if api_name(e.name) in KERNEL_LAUNCH_APIS]

    def range_names(self) -> list[str]:
        return sorted({e.name for e in self.ranges})


@dataclasses.dataclass(frozen=True)
class Launch:
    """Something a host call put on the GPU: ``count`` kernels, memcpys or memsets."""

    thread: tuple
    ts: float  # start of the host call (µs)
    kind: str  # "kernel", "memcpy" or "memset"
    count: int
    names: tuple[str, ...]  # kernel names (executed) or the API name (captured)
    us: float = 0.0  # GPU time of the kernels (executed; 0 for captured launches)


class _ThreadIndex:
    """Items (with .thread and .ts) of each host thread sorted by start time."""

    def __init__(self, items: Iterable):
        self._items: dict[tuple, list] = collections.defaultdict(list)
        for item in items:
            self._items[item.thread].append(item)
        self._starts: dict[tuple, list[float]] = {}
        for thread, items_of_thread in self._items.items():
            items_of_thread.sort(key=lambda item: item.ts)
            self._starts[thread] = [item.ts for item in items_of_thread]

    def within(self, window: Event) -> list:
        """Items on ``window``'s thread that start inside it, in [start, end)."""
        starts = self._starts.get(window.thread)
        if not starts:
            return []
        lo = bisect.bisect_left(starts, window.ts)
        hi = bisect.bisect_left(starts, window.end)
        return self._items[window.thread][lo:hi]


def _api_kind(call: Event) -> str | None:
    name = api_name(call.name)
    if name in KERNEL_LAUNCH_APIS:
        return "kernel"
    if _MEMCPY_API.match(name):
        return "memcpy"
    if _MEMSET_API.match(name):
        return "memset"
    return None


def _device_kind(event: Event) -> str:
    if event.cat in _KERNEL_CATS:
        return "kernel"
    return "memcpy" if event.cat in _MEMCPY_CATS else "memset"


def executed_launches(parsed: ParsedTrace) -> list[Launch]:
    """Device events the profiler saw, placed at the host call that launched them (joined by
    correlation id). A ``cudaGraphLaunch`` carries all the kernels of that replay."""
    calls = {c.correlation: c for c in parsed.api_calls if c.correlation is not None}
    grouped: dict[tuple[int, str], list[Event]] = collections.defaultdict(list)
    for event in (*parsed.kernels, *parsed.memcpys, *parsed.memsets):
        if event.correlation in calls:
            grouped[(event.correlation, _device_kind(event))].append(event)
    return [
        Launch(
            calls[corr].thread,
            calls[corr].ts,
            kind,
            len(evs),
            tuple(e.name for e in evs),
            sum(e.end - e.ts for e in evs),
        )
        for (corr, kind), evs in grouped.items()
    ]


def recorded_launches(parsed: ParsedTrace) -> list[Launch]:
    """Every launch/memcpy/memset host call, one each, whether or not it ran (while a stream
    is capturing, launch calls only add nodes to the graph)."""
    return [
        Launch(c.thread, c.ts, kind, 1, (api_name(c.name),))
        for c in parsed.api_calls
        if (kind := _api_kind(c)) is not None
    ]


def capture_windows(parsed: ParsedTrace) -> list[Event]:
    """One window per CUDA-graph capture: from BeginCapture to EndCapture on one thread."""
    windows, open_begin = [], {}
    for call in parsed.api_calls:
        name = api_name(call.name)
        if _CAPTURE_BEGIN.match(name):
            open_begin[call.thread] = call
        elif _CAPTURE_END.match(name) and call.thread in open_begin:
            begin = open_begin.pop(call.thread)
            windows.append(dataclasses.replace(begin, name="capture", end=call.end))
    return windows


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepCounts:
    """What one decode step launches (eager), or what one captured step's graph holds."""

    kernels: int
    memcpy: int
    memset: int
    # range name -> kernels in each instance of that range inside the step, in order
    # (for a fusion step: one entry per layer)
    ranges: dict[str, list[int]]
    # range name -> GPU µs of the kernels of each instance (executed kernels only)
    range_us: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    kernel_us: float = 0.0  # GPU µs of all kernels of the step (executed kernels only)

    def __add__(self, other: StepCounts) -> StepCounts:
        names = {*self.ranges, *other.ranges}
        timed = {*self.range_us, *other.range_us}
        return StepCounts(
            self.kernels + other.kernels,
            self.memcpy + other.memcpy,
            self.memset + other.memset,
            {n: self.ranges.get(n, []) + other.ranges.get(n, []) for n in names},
            {n: self.range_us.get(n, []) + other.range_us.get(n, []) for n in timed},
            self.kernel_us + other.kernel_us,
        )


@dataclasses.dataclass
class LaunchCounts:
    """Launch counts per decode step (= per token at batch 1), attributed to marked ranges.

    ``mode`` is "eager" (kernels the profiler saw executed) or "graph" (what the captured graph
    holds plus what a replay step launches outside it; see the module docstring).
    """

    mode: str
    steps: list[StepCounts]
    range_kernel_names: dict[str, dict[str, int]]  # range -> kernel (or API) name -> count
    replay_kernels_seen: list[int] | None = None  # graph-mode cross-check; None: not reported

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def _mean(self, values: list[float]) -> float:
        return sum(values) / len(values)

    @property
    def kernels_per_step(self) -> float:
        return self._mean([s.kernels for s in self.steps])

    @property
    def memcpy_per_step(self) -> float:
        return self._mean([s.memcpy for s in self.steps])

    @property
    def memset_per_step(self) -> float:
        return self._mean([s.memset for s in self.steps])

    def range_instances(self, name: str) -> list[int]:
        """Kernels of every instance of range ``name`` over all steps (e.g. one per layer)."""
        return [n for s in self.steps for n in s.ranges.get(name, [])]

    def range_per_step(self, name: str) -> float:
        """Kernels inside all ``name`` ranges of a step, averaged over steps."""
        return self._mean([sum(s.ranges.get(name, [])) for s in self.steps])

    def range_per_instance(self, name: str) -> float:
        """Kernels per instance of ``name`` (per layer, for a fusion step)."""
        instances = self.range_instances(name)
        if not instances:
            raise TraceError(f"no {name!r} ranges inside the counted decode steps")
        return self._mean(instances)

    def range_us_per_step(self, name: str) -> float:
        """GPU µs of the kernels inside all ``name`` ranges of a step (executed kernels)."""
        return self._mean([sum(s.range_us.get(name, [])) for s in self.steps])

    @property
    def kernel_us_per_step(self) -> float:
        return self._mean([s.kernel_us for s in self.steps])

    @property
    def uniform(self) -> bool:
        """Every step launched the same: the per-step numbers are exact, not averages."""

        def counts(s: StepCounts):
            return (s.kernels, s.memcpy, s.memset, s.ranges)

        return all(counts(s) == counts(self.steps[0]) for s in self.steps)

    @property
    def replay_matches(self) -> bool | None:
        """Graph mode: the kernels seen per replay equal the counted ones (None: not seen)."""
        if self.replay_kernels_seen is None:
            return None
        return self.replay_kernels_seen == [s.kernels for s in self.steps]

    def to_json(self) -> dict:
        out = {
            "mode": self.mode,
            "steps": self.num_steps,
            "uniform": self.uniform,
            "kernels_per_step": self.kernels_per_step,
            "memcpy_per_step": self.memcpy_per_step,
            "memset_per_step": self.memset_per_step,
            "kernel_us_per_step": self.kernel_us_per_step if self.mode == "eager" else None,
            "ranges": {},
            "replay_kernels_seen": self.replay_kernels_seen,
        }
        for name in sorted({n for s in self.steps for n in s.ranges}):
            instances = self.range_instances(name)
            if not instances:
                continue
            out["ranges"][name] = {
                "per_step": self.range_per_step(name),
                "instances_per_step": len(instances) / self.num_steps,
                "per_instance": self.range_per_instance(name),
                "uniform": len(set(instances)) == 1,
                "kernel_names": self.range_kernel_names.get(name, {}),
            }
            if self.mode == "eager":
                out["ranges"][name]["us_per_step"] = self.range_us_per_step(name)
        return out


def _count_window(
    window: Event,
    launches: _ThreadIndex,
    ranges: _ThreadIndex,
    range_names: tuple[str, ...],
    names: dict[str, collections.Counter],
) -> StepCounts:
    totals = collections.Counter()
    kernel_us = 0.0
    for launch in launches.within(window):
        totals[launch.kind] += launch.count
        if launch.kind == "kernel":
            kernel_us += launch.us
    per_range: dict[str, list[int]] = {name: [] for name in range_names}
    per_range_us: dict[str, list[float]] = {name: [] for name in range_names}
    for r in ranges.within(window):
        if r.name not in per_range or r.end > window.end:
            continue
        kernels = [launch for launch in launches.within(r) if launch.kind == "kernel"]
        per_range[r.name].append(sum(launch.count for launch in kernels))
        per_range_us[r.name].append(sum(launch.us for launch in kernels))
        for launch in kernels:
            names[r.name].update(launch.names)
    return StepCounts(
        totals["kernel"], totals["memcpy"], totals["memset"], per_range, per_range_us, kernel_us
    )


def _overlaps(window: Event, others: list[Event]) -> bool:
    return any(
        o.thread == window.thread and o.ts < window.end and window.ts < o.end for o in others
    )


def count_launches(
    trace: str | Path | dict,
    *,
    step: str = STEP_RANGE,
    ranges: Iterable[str] = (),
    strict: bool = True,
) -> LaunchCounts:
    """Launch counts per ``step`` range (default ``decode_step``) of a torch.profiler trace.

    ``trace`` is a chrome-trace dict or a .json/.json.gz path. ``ranges`` are the marked ranges
    attributed inside each step. A trace holding a CUDA-graph capture is counted in graph mode
    (the module docstring says how), otherwise in eager mode. With ``strict`` (eager), a step
    whose kernel launch calls did not all produce a kernel event raises: the profiler lost
    events and the counts would be too low.
    """
    parsed = ParsedTrace.from_trace(load_trace(trace))
    range_names = tuple(ranges)
    if not parsed.has_cuda:
        raise TraceError(
            "the trace holds no CUDA kernel, memcpy or memset events and no launch calls: it was "
            "recorded on a machine without a GPU or without ProfilerActivity.CUDA, so it cannot "
            "give launch counts"
        )
    steps = [r for r in parsed.ranges if r.name == step]
    if not steps:
        raise TraceError(
            f"the trace has no {step!r} ranges (marked ranges found: {parsed.range_names()}): "
            f"wrap each decode step in kernels.markers.mark({step!r}) and keep markers enabled"
        )
    range_index = _ThreadIndex(parsed.ranges)
    names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    executed = _ThreadIndex(executed_launches(parsed))
    graph_launch_calls = _ThreadIndex(
        c for c in parsed.api_calls if api_name(c.name) in GRAPH_LAUNCH_APIS
    )
    captures = capture_windows(parsed)
    if not captures:
        if any(graph_launch_calls.within(s) for s in steps):
            raise TraceError(
                f"the {step!r} steps replay CUDA graphs but the trace holds no graph capture: "
                "the graph was captured before profiling. Profile the capture (a Runner that "
                "has not captured a graph for this batch size and these flags yet)"
            )
        if not (parsed.kernels or parsed.memcpys or parsed.memsets):
            raise TraceError(
                "the trace has CUDA launch calls but no kernel/memcpy/memset events: the GPU "
                "activity was not recorded (profile with ProfilerActivity.CUDA and synchronize "
                "before the profiler stops)"
            )
        counted = [_count_window(s, executed, range_index, range_names, names) for s in steps]
        if strict:
            launch_calls = _ThreadIndex(parsed.launch_calls())
            for s, counts in zip(steps, counted, strict=True):
                launched = len(launch_calls.within(s))
                if counts.kernels < launched:
                    raise TraceError(
                        f"a {step!r} step made {launched} kernel launch calls but the profiler "
                        f"reported {counts.kernels} kernels for them: events were lost "
                        "(synchronize before stopping the profiler); counts would be too low"
                    )
        return LaunchCounts("eager", counted, {k: dict(v) for k, v in names.items()})

    recorded = _ThreadIndex(recorded_launches(parsed))
    held = [_count_window(w, recorded, range_index, range_names, names) for w in captures]
    replays = [s for s in steps if not _overlaps(s, captures) and graph_launch_calls.within(s)]
    if len(held) == 1 and replays:
        # Launch calls a replay step makes outside its graph (an input copy) run every token.
        outside = [_count_window(s, recorded, range_index, (), names) for s in replays]
        counted = [held[0] + extra for extra in outside]
        seen = [_count_window(s, executed, range_index, (), names).kernels for s in replays]
    else:
        counted, seen = held, []
    return LaunchCounts(
        "graph",
        counted,
        {k: dict(v) for k, v in names.items()},
        replay_kernels_seen=seen if any(seen) else None,
    )


# --------------------------------------------------------------------------------------------
# Profiling a runner
# --------------------------------------------------------------------------------------------


def random_prompt(runner, batch: int, prompt_len: int, seed: int = 0):
    """Token ids [batch, prompt_len] on the runner's device, uniform over the vocabulary."""
    import torch

    if batch < 1 or prompt_len < 1:
        raise ValueError(f"batch ({batch}) and prompt_len ({prompt_len}) must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    vocab = runner.model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator)
    return ids.to(runner.device)


def record_decode_trace(
    runner,
    steps: int,
    path: str | Path,
    *,
    batch: int = 1,
    prompt_len: int = 8,
    warmup: int = 2,
    seed: int = 0,
) -> Path:
    """Prefill a random prompt, then decode under torch.profiler; export the chrome trace.

    Eager runner: ``warmup`` unprofiled decode steps, then ``steps`` profiled ones. CUDA-graph
    runner: no warm-up; the profile holds ``steps + 1`` decode steps, the first of which warms
    up and captures the graph (the Runner captures lazily per batch size and flags), so the
    runner must not have captured that graph yet. ``path`` may end in .gz.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    graphed = bool(getattr(runner, "cuda_graph", False)) and runner.device.type == "cuda"
    decode_calls = steps + 1 if graphed else steps
    needed = prompt_len + (0 if graphed else warmup) + decode_calls
    if needed > runner.max_seq_len:
        raise ValueError(
            f"prompt_len + warmup + steps needs {needed} cache positions; the runner's "
            f"max_seq_len is {runner.max_seq_len}"
        )
    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)

    def sync():
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)

    with torch.inference_mode():
        token = runner.prefill(random_prompt(runner, batch, prompt_len, seed)).argmax(-1)
        for _ in range(0 if graphed else warmup):
            token = runner.decode(token).argmax(-1)
        sync()
        with warnings.catch_warnings():
            # torch 2.11 warns on every profile() without a schedule that events are cleared
            # per cycle: we use one cycle.
            warnings.filterwarnings("ignore", message=".*Profiler clears events")
            with profile(activities=activities) as prof:
                for _ in range(decode_calls):
                    token = runner.decode(token).argmax(-1)
                sync()
    return export_trace(prof, path)


def export_trace(prof, path: str | Path) -> Path:
    """Write a profiler's chrome trace to ``path`` (gzipped when it ends in .gz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return path
    plain = path.with_suffix("")  # x.json.gz -> x.json
    prof.export_chrome_trace(str(plain))
    with open(plain, "rb") as src, gzip.open(path, "wb") as dst:
        dst.write(src.read())
    plain.unlink()
    return path


def profile_decode(
    runner,
    steps: int = 4,
    *,
    batch: int = 1,
    prompt_len: int = 8,
    warmup: int = 2,
    trace_path: str | Path | None = None,
    seed: int = 0,
    ranges: Iterable[str] = (),
) -> LaunchCounts:
    """Launch counts per decode step of ``runner`` (record_decode_trace, then count_launches).

    The trace is kept at ``trace_path`` when given (else written to a temporary file). In
    CUDA-graph mode pass a Runner that has not captured a graph for this batch size and these
    flags yet (a fresh one): the capture is what is counted.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(trace_path) if trace_path is not None else Path(tmp) / "decode.json"
        record_decode_trace(
            runner, steps, path, batch=batch, prompt_len=prompt_len, warmup=warmup, seed=seed
        )
        counts = count_launches(path, ranges=ranges)
    if counts.num_steps != steps:
        raise TraceError(
            f"counted {counts.num_steps} decode steps in the trace, expected {steps} "
            f"(mode {counts.mode}): was the graph captured before profiling?"
        )
    return counts
