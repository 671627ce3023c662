"""The main job, ``python -m profiling``: on CPU it runs a small model through the interpreter,
says its timings mean nothing, and writes the JSON, a chrome trace and a PNG; ``gate`` and
``record`` refuse to pass or write anything without a GPU."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gate_helpers import synthetic_report

from profiling import report
from profiling.baselines import make_baseline

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = __import__("torch").cuda.is_available()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "profiling", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU (interpreter) run of the report")
def test_report_on_cpu_writes_json_trace_and_plot(tmp_path):
    out = tmp_path / "report"
    run = _run("--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "timings mean nothing" in run.stdout
    assert "no baseline: record with python -m profiling record" in run.stdout
    data = json.loads((out / "report.json").read_text())
    assert data["interpreted"] is True
    assert data["baseline"]["status"] == "none"
    entry = data["modes"]["eager-b1"]
    assert set(entry) >= {"fused", "unfused", "speedup"}
    assert len(entry["fused"]["tok_s_repeats"]) >= 5
    assert entry["fused"]["launches_per_token"] is None  # no CUDA: not counted, not zero
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with gzip.open(out / data["trace"], "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"decode_step", "layer.0", "layer.1", "o_proj_residual"} <= names
    # The progress bar went to stderr, the table to stdout.
    assert "report" in run.stderr and "eager-b1" in run.stdout


@pytest.mark.skipif(HAS_GPU, reason="checks the refusals without a GPU")
def test_gate_and_record_without_gpu_never_pass_nor_write(tmp_path):
    root = tmp_path / "perf_baselines"
    gate = _run("gate", "--root", str(root), cwd=tmp_path)
    assert gate.returncode == 3, gate.stdout + gate.stderr
    record = _run("record", "--root", str(root), cwd=tmp_path)
    assert record.returncode == 2 and "needs a CUDA GPU" in record.stderr
    assert not root.exists()


def test_table_shows_baseline_values_in_parentheses():
    baseline = make_baseline(synthetic_report(seed=1))
    current = synthetic_report(seed=2, fused_extra_per_layer=1)
    text = report.table(current, baseline)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["mode", "path", "launches/token"]
    fused_eager = next(line for line in lines if line.startswith("eager-b1  fused"))
    now = current["modes"]["eager-b1"]["fused"]["launches_per_token"]
    then = baseline["modes"]["eager-b1"]["fused"]["launches_per_token"]
    assert f"{now:g} ({then:g})" in fused_eager
    assert "(" not in report.table(current, None).splitlines()[2]


def test_plot_writes_a_png(tmp_path):
    current = synthetic_report(seed=3)
    path = report.plot(current, make_baseline(synthetic_report(seed=4)), tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
