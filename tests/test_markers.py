"""Markers: one context manager = a torch.profiler record_function (what launches.py
attributes kernels to) + an NVTX range in the fusionguard domain; switchable off; cheap when
nothing listens. The NVTX side is proven for real on the GPU by scripts/ncu_nvtx_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kernels import markers
from kernels.markers import mark, set_markers_enabled

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def markers_on():
    previous = markers.markers_enabled()
    set_markers_enabled(True)
    yield
    set_markers_enabled(previous)


def _annotations(prof, tmp_path) -> list[dict]:
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    return [e for e in events if e.get("cat") == "user_annotation"]


def test_marks_become_nested_record_function_ranges(markers_on, tmp_path):
    with profile(activities=[ProfilerActivity.CPU]) as prof, mark("decode_step"):
        for i in range(2):
            with mark(f"layer.{i}"), mark("o_proj_residual"):
                torch.ones(4).add_(1)
    ranges = _annotations(prof, tmp_path)
    names = [e["name"] for e in sorted(ranges, key=lambda e: e["ts"])]
    assert names == [
        "decode_step",
        "layer.0",
        "o_proj_residual",
        "layer.1",
        "o_proj_residual",
    ]
    step = next(e for e in ranges if e["name"] == "decode_step")
    for inner in ranges:
        assert step["ts"] <= inner["ts"]
        assert inner["ts"] + inner["dur"] <= step["ts"] + step["dur"]


def test_markers_switched_off_emit_nothing(markers_on, tmp_path):
    set_markers_enabled(False)
    with profile(activities=[ProfilerActivity.CPU]) as prof, mark("decode_step"):
        torch.ones(4).add_(1)
    assert _annotations(prof, tmp_path) == []


def test_env_var_switches_markers_off_at_import():
    code = "from kernels.markers import markers_enabled; print(markers_enabled())"
    env = {**os.environ, "FUSIONGUARD_MARKERS": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_no_record_function_without_a_profiler(markers_on, monkeypatch):
    """Without a profiler attached, mark() never builds a record_function."""

    def forbidden(name):
        raise AssertionError(f"record_function({name!r}) created with no profiler running")

    monkeypatch.setattr(torch.autograd.profiler, "record_function", forbidden)
    with mark("decode_step"):
        pass


def test_mark_is_cheap_when_nothing_listens(markers_on):
    calls = 20_000
    start = time.perf_counter()
    for _ in range(calls):
        with mark("o_proj_residual"):
            pass
    per_call_us = (time.perf_counter() - start) / calls * 1e6
    # A decode step of the default model makes ~60 marks; a GPU token takes >= 400 µs.
    # Generous for slow shared CI cores, and far below what would distort a step.
    assert per_call_us < 25, f"mark() costs {per_call_us:.1f} µs with nothing listening"


def test_nvtx_ranges_are_pushed_and_popped_in_the_fusionguard_domain(markers_on, monkeypatch):
    """Wiring check (a recording stand-in for the NVTX domain); ncu proves the real thing."""
    if not markers.nvtx_available():
        pytest.skip("the nvtx package is not installed")
    seen = []

    class RecordingDomain:
        def get_event_attributes(self, message):
            return message

        def push_range(self, attributes):
            seen.append(("push", attributes))

        def pop_range(self):
            seen.append(("pop", None))

    assert markers.DOMAIN == "fusionguard"
    monkeypatch.setattr(markers, "_domain", RecordingDomain())
    monkeypatch.setattr(markers, "_attributes", {})
    with mark("layer.0"), mark("o_proj_residual"):
        pass
    assert seen == [
        ("push", "layer.0"),
        ("push", "o_proj_residual"),
        ("pop", None),
        ("pop", None),
    ]
