"""The time breakdown: where a decoded token's GPU time goes, step by step.

From a torch.profiler trace of eager decode steps (profiling/launches.py reads it): for every
marked segment (each fusion step, each unfused op) the GPU time of the kernels it launched,
per decode step, beside the step's bandwidth floor (the bytes it must move over the measured
copy bandwidth). Eager, because a CUDA graph replay runs no Python and so carries no ranges;
each kernel's own duration is the same in both modes (in a graph, programmatic dependent
launch overlaps a kernel's start with its predecessor's tail, so the graph's step time is
less than the sum). Under the interpreter (CPU) there are no kernels: the host time of each
range is shown instead, and it means nothing about a GPU.
"""

from __future__ import annotations

import collections
from pathlib import Path

from profiling.launches import (
    STEP_RANGE,
    ParsedTrace,
    TraceError,
    _ThreadIndex,
    executed_launches,
    load_trace,
)

GROUP_ORDER = ("fusion", "gemm", "attention", "norm", "other")


def segment_times(trace: str | Path | dict, names) -> dict:
    """Per segment name: instances and µs per decode step, summed over its instances.

    ``source`` is "gpu kernels" when the trace holds kernels, else "host ranges".
    """
    parsed = ParsedTrace.from_trace(load_trace(trace))
    steps = [r for r in parsed.ranges if r.name == STEP_RANGE]
    if not steps:
        raise TraceError(f"the trace has no {STEP_RANGE!r} ranges: nothing to break down")
    names = set(names)
    gpu = bool(parsed.kernels)
    launches = _ThreadIndex(executed_launches(parsed)) if gpu else None
    ranges = _ThreadIndex(parsed.ranges)
    us = collections.defaultdict(float)
    instances = collections.Counter()
    total = 0.0
    for step in steps:
        if gpu:
            total += sum(x.us for x in launches.within(step) if x.kind == "kernel")
        else:
            total += step.end - step.ts
        for r in ranges.within(step):
            if r.name not in names or r.end > step.end:
                continue
            instances[r.name] += 1
            if gpu:
                us[r.name] += sum(x.us for x in launches.within(r) if x.kind == "kernel")
            else:
                us[r.name] += r.end - r.ts
    n = len(steps)
    return {
        "source": "gpu kernels" if gpu else "host ranges",
        "steps": n,
        "total_us_per_step": total / n,
        "segments": {
            name: {"us_per_step": us[name] / n, "instances_per_step": instances[name] / n}
            for name in instances
        },
    }


def with_stages(times: dict, fusion: str, stage_us_per_step: dict[str, float]) -> dict:
    """``times`` (segment_times output) with a row per stage of ``fusion``'s kernel (µs per
    step from its in-kernel stamps), each marked as part of the fusion's own row."""
    instances = times["segments"][fusion]["instances_per_step"]
    segments = dict(times["segments"])
    for stage, us in stage_us_per_step.items():
        segments[f"{fusion}.{stage}"] = {
            "us_per_step": us,
            "instances_per_step": instances,
            "part_of": fusion,
        }
    return {**times, "segments": segments}


def build(
    times: dict[str, dict],
    floors: dict[str, dict],
    groups: dict[str, str],
    order: list[str],
) -> dict:
    """The breakdown of each variant (``times``: variant -> segment_times output): rows in
    program order, each with its group, µs per step and floor."""
    out = {}
    for variant, t in times.items():
        rows = []
        for name in sorted(t["segments"], key=lambda n: order.index(n) if n in order else 999):
            seg = t["segments"][name]
            rows.append(
                {
                    "name": name,
                    "group": groups.get(name, "other"),
                    "us_per_step": seg["us_per_step"],
                    "instances_per_step": seg["instances_per_step"],
                    "floor_us": floors.get(name, {}).get("floor_us"),
                    "position": order.index(name) if name in order else len(order),
                    # A stage's row is a share of its kernel's row: not added again below.
                    "part_of": seg.get("part_of"),
                }
            )
        accounted = sum(r["us_per_step"] for r in rows if not r["part_of"])
        out[variant] = {
            "source": t["source"],
            "steps": t["steps"],
            "total_us_per_step": t["total_us_per_step"],
            "unmarked_us_per_step": max(0.0, t["total_us_per_step"] - accounted),
            "rows": rows,
        }
    return out


def table(breakdown: dict, *, meaningless: bool = False) -> str:
    """Rows: segment, group, µs per step for each variant, floor."""
    variants = list(breakdown)
    names: list[str] = []
    info: dict[str, dict] = {}
    for v in variants:
        for r in breakdown[v]["rows"]:
            if r["name"] not in info:
                names.append(r["name"])
                info[r["name"]] = r
    names.sort(key=lambda n: info[n].get("position", 0))
    header = ("step", "group", *(f"{v} µs" for v in variants), "floor µs")
    rows = [header]
    for name in names:
        cells = []
        for v in variants:
            hit = next((r for r in breakdown[v]["rows"] if r["name"] == name), None)
            cells.append(f"{hit['us_per_step']:.1f}" if hit else "-")
        floor = info[name]["floor_us"]
        shown = f"  {name}" if info[name].get("part_of") else name
        rows.append(
            (shown, info[name]["group"], *cells, "n/a" if floor is None else f"{floor:.1f}")
        )
    rows.append(
        (
            "(unmarked)",
            "",
            *(f"{breakdown[v]['unmarked_us_per_step']:.1f}" for v in variants),
            "",
        )
    )
    rows.append(("total", "", *(f"{breakdown[v]['total_us_per_step']:.1f}" for v in variants), ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    source = breakdown[variants[0]]["source"]
    lines.append(
        f"(µs per decode step from {source}"
        + ("; the interpreter's host time: meaningless for a GPU)" if meaningless else ")")
    )
    if any(r.get("part_of") for v in variants for r in breakdown[v]["rows"]):
        lines.append(
            "(an indented row: one stage of the kernel above it, from that kernel's in-kernel "
            "timestamps; its stages add up to its span, the barrier's wait in the later stage)"
        )
    return "\n".join(lines)
