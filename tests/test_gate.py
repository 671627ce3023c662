"""The regression gate (D6) is itself tested.

CPU: the gate's logic on synthetic reports and files: a pass, each failure reason, a missing,
corrupt, foreign-GPU or mismatched baseline, and pytest-benchmark's compare wired to the
per-GPU folder. Nothing here writes perf_baselines/: files go to tmp_path.

GPU: against this GPU's stored baseline (skipped, with how to record one, when there is none):
unchanged code passes 5 times in a row; each planted regression fails it (fusion forced off,
one extra kernel per layer, a slowed kernel with the same launch count, numerics off by 1e-2).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gate_helpers import H100, H200, LAYERS, OTHER_PER_LAYER, synthetic_report

from kernels.fused_attn_output import (
    KernelConfig,
    attn_output_residual_float64,
    fused_attn_output_residual,
    unfused_attn_output_residual,
    use_config,
)
from profiling import baselines
from profiling.baselines import (
    TOLERANCE_FLOOR,
    BaselineCorrupt,
    BaselineError,
    BaselineMismatch,
    BaselineMissing,
    ForeignBaseline,
    compare,
    load_baseline,
    make_baseline,
    write_baseline,
)
from profiling.numerics import check_fused_numerics, draw_inputs


def stored_baseline_or_skip(slug: str | None = None, root=baselines.BASELINE_ROOT) -> dict:
    """This GPU's baseline; a GPU without one is skipped (saying how to record one), never
    passed; an unusable one fails."""
    try:
        return load_baseline(slug, root=root)
    except BaselineMissing as exc:
        pytest.skip(str(exc))
    except BaselineError as exc:
        pytest.fail(f"unusable baseline: {exc}")


@pytest.fixture
def baseline():
    return make_baseline(synthetic_report(seed=1))


# --------------------------------------------------------------------------------------------
# CPU: the comparison
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_same_performance_passes(baseline, seed):
    result = compare(synthetic_report(seed=100 + seed), baseline)
    assert result.ok, result.summary()
    assert {c.kind for c in result.checks} == {"launches", "tok_s", "speedup"}


def test_one_more_kernel_per_token_fails_on_launches(baseline):
    current = synthetic_report(seed=2)
    current["modes"]["graph-b1"]["fused"]["launches_per_token"] += 1
    result = compare(current, baseline)
    assert not result.ok
    assert result.failed_kinds() == {"launches"}
    assert "graph-b1" in {c.mode for c in result.failures}


def test_an_extra_kernel_per_layer_in_the_step_fails_on_launches(baseline):
    result = compare(synthetic_report(seed=2, fused_extra_per_layer=1), baseline)
    assert result.failed_kinds() == {"launches"}
    messages = " ".join(c.message for c in result.failures)
    assert "o_proj_residual_per_layer rose: 2 > 1" in messages
    assert f"launches_per_token rose: {LAYERS * (OTHER_PER_LAYER + 2) + 2}" in messages


def test_fewer_launches_pass_with_a_note_to_re_record(baseline):
    current = synthetic_report(seed=2)
    current["modes"]["eager-b1"]["unfused"]["memcpy_per_token"] = 1
    result = compare(current, baseline)
    assert result.ok, result.summary()
    assert any("re-record" in n for n in result.notes)


def test_fused_tok_s_below_the_tolerance_fails(baseline):
    tol = baseline["modes"]["eager-b1"]["fused_tok_s_tolerance"]
    slower = synthetic_report(seed=3, fused_tok_s=1000.0 * (1 - 2 * tol), noise=0.002)
    result = compare(slower, baseline)
    assert "tok_s" in result.failed_kinds()
    within = synthetic_report(seed=3, fused_tok_s=1000.0 * (1 - tol / 3), noise=0.002)
    assert "tok_s" not in compare(within, baseline).failed_kinds()


def test_speedup_under_its_floor_fails(baseline):
    floor = baseline["modes"]["eager-b1"]["speedup_floor"]
    # Fused as fast as before, the unfused path caught up: the fusion's win has shrunk.
    current = synthetic_report(seed=4, unfused_tok_s=1000.0 / (floor * 0.97), noise=0.002)
    result = compare(current, baseline)
    assert result.failed_kinds() == {"speedup"}


def test_a_mode_missing_from_the_current_run_fails(baseline):
    result = compare(synthetic_report(seed=5, modes=("eager",)), baseline)
    assert result.failed_kinds() == {"mode"}


def test_numerics_off_by_1e2_fails_the_gate(baseline):
    x, r, w = draw_inputs(4, 64, 128, torch.float32, "cpu")

    def exact(x, r, w, rw=1.0, *, out):
        return out.copy_(attn_output_residual_float64(x, r, w, rw))

    def perturbed(x, r, w, rw=1.0, *, out):
        return out.copy_(unfused_attn_output_residual(x, r, w, rw) + 1e-2)

    good = check_fused_numerics(exact, x, r, w)
    bad = check_fused_numerics(perturbed, x, r, w)
    current = synthetic_report(seed=6)
    assert compare(current, baseline, numerics=[good]).ok
    result = compare(current, baseline, numerics=[good, bad])
    assert result.failed_kinds() == {"numerics"}


# --------------------------------------------------------------------------------------------
# CPU: tolerances and files
# --------------------------------------------------------------------------------------------


def test_tolerance_follows_the_measured_spread():
    quiet = make_baseline(synthetic_report(seed=7, noise=0.002))
    noisy = make_baseline(synthetic_report(seed=7, noise=0.2))
    for key in ("eager-b1", "graph-b1"):
        assert quiet["modes"][key]["fused_tok_s_tolerance"] == TOLERANCE_FLOOR
        entry = noisy["modes"][key]
        repeats = entry["fused"]["tok_s_repeats"]
        med = statistics.median(repeats)
        mad = statistics.median(abs(x - med) for x in repeats)
        expected = max(3 * mad / med, (max(repeats) - min(repeats)) / med, TOLERANCE_FLOOR)
        assert entry["fused_tok_s_tolerance"] == pytest.approx(expected)
        assert entry["fused_tok_s_tolerance"] > TOLERANCE_FLOOR
        assert entry["fused_tok_s_min"] == pytest.approx(med * (1 - expected))
    assert "max(3 * mad_rel, spread_rel, 0.05)" in noisy["tolerance_formula"]


def test_no_baseline_from_a_cpu_run_or_without_launch_counts():
    cpu = synthetic_report(seed=8)
    cpu.update(gpu="cpu", gpu_slug="cpu", interpreted=True)
    with pytest.raises(ValueError, match="CPU"):
        make_baseline(cpu)
    uncounted = synthetic_report(seed=8)
    uncounted["modes"]["eager-b1"]["fused"]["launches_per_token"] = None
    with pytest.raises(ValueError, match="launch counts"):
        make_baseline(uncounted)


def test_write_then_load_round_trip(tmp_path):
    report = synthetic_report(seed=9)
    path = write_baseline(report, root=tmp_path, kernel_compare_fail="median:7%")
    assert path == tmp_path / H100[1] / "throughput.json"
    loaded = load_baseline(H100[1], root=tmp_path)
    assert loaded["kernel_compare_fail"] == "median:7%"
    assert compare(synthetic_report(seed=10), loaded).ok


def test_missing_baseline_says_how_to_record_one(tmp_path):
    with pytest.raises(BaselineMissing, match="python -m profiling record"):
        load_baseline(H100[1], root=tmp_path)
    with pytest.raises(pytest.skip.Exception, match="python -m profiling record"):
        stored_baseline_or_skip(H100[1], root=tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"schema": "something-else"}),
        "corrupt-median",
        "missing-mode-field",
    ],
)
def test_corrupt_baseline_is_an_error_not_a_pass(tmp_path, content):
    path = write_baseline(synthetic_report(seed=11), root=tmp_path)
    data = json.loads(path.read_text())
    if content == "corrupt-median":
        data["modes"]["eager-b1"]["fused"]["tok_s_median"] = "fast"
        content = json.dumps(data)
    elif content == "missing-mode-field":
        del data["modes"]["graph-b1"]["speedup_floor"]
        content = json.dumps(data)
    path.write_text(content)
    with pytest.raises(BaselineCorrupt, match="re-record"):
        load_baseline(H100[1], root=tmp_path)
    with pytest.raises(pytest.fail.Exception, match="unusable baseline"):
        stored_baseline_or_skip(H100[1], root=tmp_path)


def test_foreign_gpu_baseline_never_compares(tmp_path):
    path = write_baseline(synthetic_report(seed=12), root=tmp_path)
    # An H100 file found in the H200 folder (copied by hand): refused.
    (tmp_path / H200[1]).mkdir()
    (tmp_path / H200[1] / "throughput.json").write_text(path.read_text())
    with pytest.raises(ForeignBaseline, match="never gate another"):
        load_baseline(H200[1], root=tmp_path)
    with pytest.raises(ForeignBaseline):
        compare(synthetic_report(seed=12, gpu=H200), load_baseline(H100[1], root=tmp_path))


def test_other_config_or_settings_is_a_mismatch(baseline):
    with pytest.raises(BaselineMismatch, match="config"):
        compare(synthetic_report(seed=13, layers=LAYERS + 1), baseline)
    with pytest.raises(BaselineMismatch, match="prompt_len"):
        compare(synthetic_report(seed=13, prompt_len=32), baseline)


# --------------------------------------------------------------------------------------------
# CPU: kernel medians through pytest-benchmark's own compare
# --------------------------------------------------------------------------------------------

BENCH_TEST = """
import time

def test_sleepy(benchmark):
    benchmark.pedantic(time.sleep, args=(0.004,), rounds=5, iterations=1)
"""
BENCH_CONFTEST = """
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["gpu"] = "Test GPU"
    machine_info["gpu_slug"] = "test-gpu"
"""


def _run_bench(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench_test.py", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


def _scaled_copy(saved: Path, factor: float, name: str) -> Path:
    """The saved run with every timing multiplied by ``factor`` (a faster/slower baseline)."""
    data = json.loads(saved.read_text())
    for bench in data["benchmarks"]:
        stats = bench["stats"]
        for key in (
            "min",
            "max",
            "mean",
            "median",
            "q1",
            "q3",
            "ld15iqr",
            "hd15iqr",
            "iqr",
            "stddev",
        ):
            stats[key] *= factor
        stats["data"] = [t * factor for t in stats.get("data", [])]
        stats["ops"] /= factor
    target = saved.with_name(name)
    target.write_text(json.dumps(data))
    return target


def test_kernel_medians_gate_uses_the_per_gpu_folder(tmp_path):
    (tmp_path / "bench_test.py").write_text(BENCH_TEST)
    (tmp_path / "conftest.py").write_text(BENCH_CONFTEST)
    root = tmp_path / "perf_baselines"
    with pytest.raises(BaselineMissing, match="pytest-benchmark baseline"):
        baselines.pytest_benchmark_compare_args("test-gpu", root=root)

    saved_run = _run_bench(tmp_path, baselines.pytest_benchmark_save_args("test-gpu", root=root))
    assert saved_run.returncode == 0, saved_run.stdout + saved_run.stderr
    saved = baselines.kernel_benchmark_file("test-gpu", root=root)
    assert saved.parent.parent == root / "test-gpu"  # under pytest-benchmark's machine-id folder
    data = baselines.load_kernel_benchmarks(saved, "test-gpu")
    assert baselines.kernel_compare_fail(data).startswith("median:")

    # A baseline 4x slower than now: the current run is faster, the compare passes.
    _scaled_copy(saved, 4.0, "0002_slow.json")
    args = baselines.pytest_benchmark_compare_args("test-gpu", root=root)
    assert any(a.endswith("0002_slow.json") for a in args)
    passed = _run_bench(tmp_path, args)
    assert passed.returncode == 0, passed.stdout + passed.stderr

    # A baseline 4x faster than now: the medians regressed, pytest-benchmark fails the run.
    _scaled_copy(saved, 0.25, "0003_fast.json")
    failed = _run_bench(tmp_path, baselines.pytest_benchmark_compare_args("test-gpu", root=root))
    assert failed.returncode != 0, failed.stdout + failed.stderr
    assert "Performance has regressed" in failed.stdout + failed.stderr

    with pytest.raises(ForeignBaseline):
        baselines.load_kernel_benchmarks(saved, "nvidia-h200")


# --------------------------------------------------------------------------------------------
# GPU: the gate against this GPU's stored baseline
# --------------------------------------------------------------------------------------------

# Tiny tiles: same single launch per layer, many more programs and loop iterations.
SLOW_CONFIG = KernelConfig("gemv", BLOCK_M=1, BLOCK_N=2, BLOCK_K=16, num_warps=1)


@pytest.fixture(scope="module")
def stored_baseline():
    return stored_baseline_or_skip()


@pytest.fixture(scope="module")
def gate_model(stored_baseline):
    from profiling.gate import default_model

    return default_model()


def _gate(model, stored_baseline):
    from profiling.gate import run_gate

    result, current = run_gate(model, stored_baseline)
    print("\n" + result.summary())
    return result, current


def _launch_rise(current, stored_baseline, path="fused") -> set[float]:
    return {
        current["modes"][k][path]["launches_per_token"] - b[path]["launches_per_token"]
        for k, b in stored_baseline["modes"].items()
    }


@pytest.mark.gpu
@pytest.mark.parametrize("attempt", range(5))
def test_unchanged_code_passes_the_gate(gate_model, stored_baseline, attempt):
    result, _ = _gate(gate_model, stored_baseline)
    assert result.ok, result.summary()


@pytest.mark.gpu
def test_gate_fails_when_fusion_is_forced_off(gate_model, stored_baseline, monkeypatch):
    from engine import qwen3

    original = qwen3.o_proj_residual
    monkeypatch.setattr(qwen3, "o_proj_residual", lambda a, r, w, fused: original(a, r, w, False))
    result, current = _gate(gate_model, stored_baseline)
    assert not result.ok
    assert "launches" in result.failed_kinds()
    assert _launch_rise(current, stored_baseline) == {gate_model.config.num_hidden_layers}


@pytest.mark.gpu
def test_gate_fails_with_one_extra_kernel_per_layer(gate_model, stored_baseline, monkeypatch):
    from engine import qwen3

    original = qwen3.o_proj_residual
    monkeypatch.setattr(
        qwen3, "o_proj_residual", lambda a, r, w, fused: original(a, r, w, fused).add_(0)
    )
    result, current = _gate(gate_model, stored_baseline)
    assert "launches" in result.failed_kinds()
    layers = gate_model.config.num_hidden_layers
    assert _launch_rise(current, stored_baseline) == {layers}
    assert _launch_rise(current, stored_baseline, "unfused") == {layers}


@pytest.mark.gpu
def test_gate_fails_with_a_slowed_kernel(gate_model, stored_baseline):
    with use_config(SLOW_CONFIG):
        result, _ = _gate(gate_model, stored_baseline)
    assert "launches" not in result.failed_kinds()  # same launches: only time tells
    assert "tok_s" in result.failed_kinds()


@pytest.mark.gpu
def test_gate_fails_with_numerics_off_by_1e2(gate_model, stored_baseline, monkeypatch):
    from engine import qwen3

    original = qwen3.o_proj_residual

    def off_by_1e2(a, r, w, fused):
        if not fused:
            return original(a, r, w, fused)
        # Same single launch, residual scaled by 1 + 1e-2: an error of ~1e-2 per element.
        return fused_attn_output_residual(a, r, w, residual_weight=1.0 + 1e-2)

    monkeypatch.setattr(qwen3, "o_proj_residual", off_by_1e2)
    result, _ = _gate(gate_model, stored_baseline)
    assert "numerics" in result.failed_kinds()
    assert "launches" not in result.failed_kinds()
