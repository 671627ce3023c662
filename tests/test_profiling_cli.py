"""``python -m profiling`` exit codes, as the README states them: 0 pass, 1 fail, 2 usage or
environment error, 3 no usable baseline; a baseline is validated before anything is measured.
On CPU: the real commands; the GPU paths with the GPU check patched and measuring forbidden."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import profiling.__main__ as cli
from profiling import measure

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "profiling", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(cli.HAS_GPU, reason="the CPU exit codes of commands that need a GPU")
@pytest.mark.parametrize("command", ["gate", "record", "bench"])
def test_gpu_commands_exit_2_without_a_gpu(command):
    result = _run(command)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nonsense"], "invalid choice"),
        (["--rounds", "3"], "--rounds must be >= 5"),
        (["--batches", "0"], "positive integer"),
        (["gate", "--layers", "3"], "gate measures what its baseline measured"),
        (["report", "-k", "o_proj"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def fake_gpu(monkeypatch):
    """The GPU commands' paths, on CPU: nothing may be measured."""

    def forbidden(*args, **kwargs):
        raise AssertionError("measured before the baseline was validated")

    monkeypatch.setattr(cli, "HAS_GPU", True)
    monkeypatch.setattr(cli, "build_model", forbidden)
    for name in ("measure_launches", "measure_numerics", "measure_kernel_ratios", "measure_e2e"):
        monkeypatch.setattr(measure, name, forbidden)


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing
        "{not json",
        json.dumps({"schema": "fusionguard-baseline/2", "gpu": "x"}),
    ],
)
@pytest.mark.parametrize("command", ["gate", "report"])
def test_unusable_baseline_exits_3_before_measuring(fake_gpu, tmp_path, capsys, content, command):
    from kernels.runtime import gpu_slug

    if content is not None:
        (tmp_path / gpu_slug()).mkdir()
        (tmp_path / gpu_slug() / "baseline.json").write_text(content)
    if command == "report" and content is None:
        pytest.skip("a missing baseline: the report still measures, then exits 3 (GPU only)")
    code = cli.main([command, "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 3
    err = capsys.readouterr().err
    assert "NOT RUN" in err and ("record" in err or "re-record" in err)


def test_bench_without_a_saved_run_exits_3(fake_gpu, tmp_path, capsys):
    assert cli.main(["bench", "--root", str(tmp_path)]) == 3
    assert "pytest-benchmark baseline" in capsys.readouterr().err


def test_gate_fails_with_exit_1_and_passes_with_0(monkeypatch, tmp_path, capsys):
    """The gate's verdict is its exit code (the measuring replaced by a fixed result)."""
    from profiling import gate
    from profiling.gate import Check, GateResult

    def fake_run_gate(ok):
        def run(model, baseline, *, seed=0, log=print):
            return GateResult([Check("launches", "k", "m", ok)], []), {}

        return run

    baseline = {"model": {"config": {}}}
    monkeypatch.setattr(cli, "HAS_GPU", True)
    monkeypatch.setattr(cli, "_load_baseline", lambda root: (baseline, None))
    monkeypatch.setattr(gate, "default_model", lambda config=None: None)
    for ok, code in ((True, 0), (False, 1)):
        monkeypatch.setattr(gate, "run_gate", fake_run_gate(ok))
        assert cli.main(["gate"]) == code
    assert "gate: FAIL" in capsys.readouterr().out


def test_report_on_cpu_exits_0_and_says_nothing_was_compared(tmp_path):
    if cli.HAS_GPU:
        pytest.skip("the CPU report")
    result = _run("report", "--out", str(tmp_path), "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "No CUDA GPU" in result.stdout


@pytest.mark.parametrize("stage", ["numerics", "launches"])
def test_measure_runs_only_the_stages_asked(tmp_path, stage):
    """``measure --stages``: the stage asked is measured (where it can run here), every other
    one is left out with a note saying so."""
    result = _run("measure", "--stages", stage, "--out", str(tmp_path), "--seed", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((tmp_path / "run.json").read_text())
    for name in ("launches", "numerics", "kernel_ratios", "e2e"):
        if name == stage and (cli.HAS_GPU or name == "numerics"):
            assert run[name], name
        elif name != stage:
            assert name not in run and "not among the stages asked" in run[f"{name}_note"]
