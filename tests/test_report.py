"""The report (python -m profiling): written on CPU with every section a CPU can fill (the
breakdown from host times, marked meaningless); tables and plot on synthetic runs."""

from __future__ import annotations

import json

import pytest
import torch
from gate_helpers import small_model, synthetic_report

from profiling import breakdown, report
from profiling.__main__ import HAS_GPU, main
from profiling.baselines import make_baseline


@pytest.mark.skipif(HAS_GPU, reason="the CPU report (on a GPU the report measures the 0.6B)")
def test_report_on_cpu_writes_json_plot_and_breakdown(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert data["interpreted"] is True
    assert all(r["ok"] for r in data["numerics"]), [r for r in data["numerics"] if not r["ok"]]
    names = {r["name"].split(".")[0] for r in data["numerics"]}
    assert names >= set(data["model"]["fusions"]) | {"engine"}
    bd = data["breakdown"]
    assert set(bd) == {"default", "none"}
    assert {r["name"] for r in bd["default"]["rows"]} >= set(data["model"]["default_fusions"])
    assert bd["default"]["source"] == "host ranges"
    assert "Where a decode step's time goes" in out and "meaningless" in out
    assert "not gated" in out  # eager decode is reported, not gated


def test_tables_show_baseline_values_and_limits():
    model = small_model()
    current = synthetic_report(seed=1, model=model)
    baseline = make_baseline(synthetic_report(seed=2, model=model))
    launches = report.launches_table(current, baseline)
    assert "default/graph-b1" in launches and "(" in launches
    for fusion in current["model"]["fusions"]:
        assert fusion in launches
    current["kernel_ratios"]["o_proj_residual/m1/unfused"]["path"] = "cublas"
    ratios = report.ratios_table(current, baseline)
    assert "o_proj_residual/m1/unfused" in ratios
    row = next(line for line in ratios.splitlines() if "o_proj_residual/m1/unfused" in line)
    assert "cublas" in row and "path" in ratios.splitlines()[0]
    e2e = report.e2e_table(current, baseline)
    assert "speed-up" in e2e and "floor" in e2e


def test_plot_writes_a_png(tmp_path):
    model = small_model()
    current = synthetic_report(seed=3, model=model)
    current["breakdown"] = breakdown.build(
        {
            "default": {
                "source": "gpu kernels",
                "steps": 3,
                "total_us_per_step": 50.0,
                "segments": {"o_proj_residual": {"us_per_step": 12.0, "instances_per_step": 4}},
            }
        },
        {"o_proj_residual": {"floor_us": 6.0}},
        {"o_proj_residual": "fusion"},
        ["o_proj_residual"],
    )
    path = report.plot(current, make_baseline(current), tmp_path / "r.png")
    assert path.stat().st_size > 10_000
    text = breakdown.table(current["breakdown"])
    assert "o_proj_residual" in text and "6.0" in text and "(unmarked)" in text


def test_a_kernel_spanning_steps_shows_its_stages_under_its_row():
    """Stage rows (from in-kernel stamps) sit under their kernel's row, indented, and are not
    counted again in the accounted time."""
    times = {
        "source": "gpu kernels",
        "steps": 3,
        "total_us_per_step": 300.0,
        "segments": {
            "mlp_block": {"us_per_step": 200.0, "instances_per_step": 28},
            "attention": {"us_per_step": 60.0, "instances_per_step": 28},
        },
    }
    staged = breakdown.with_stages(times, "mlp_block", {"gate_up": 120.0, "down": 70.0})
    built = breakdown.build(
        {"alt+mlp_block": staged},
        {},
        {"mlp_block": "fusion", "attention": "attention", "mlp_block.gate_up": "stage"},
        ["attention", "mlp_block", "mlp_block.gate_up", "mlp_block.down"],
    )
    assert built["alt+mlp_block"]["unmarked_us_per_step"] == 40.0  # 300 - 200 - 60
    lines = breakdown.table(built).splitlines()
    names = [line.split()[0] for line in lines[2:6]]
    assert names == ["attention", "mlp_block", "mlp_block.gate_up", "mlp_block.down"]
    assert lines[4].startswith("  mlp_block.gate_up") and "120.0" in lines[4]
    assert "in-kernel timestamps" in lines[-1]
    summary = report.stage_times_summary(
        {
            "stage_times": {
                "mlp_block": {
                    "variant": "alt+mlp_block",
                    "kernel_us_per_step": 200.0,
                    "stage_us_per_step": {"gate_up": 120.0, "down": 70.0},
                    "stages_over_kernel": 0.95,
                }
            }
        }
    )
    assert "gate_up 120.0 + down 70.0 = 190.0 µs a step; the kernel 200.0 µs (95.0%" in summary


def test_stage_times_are_read_from_each_call_of_the_variant_that_runs_the_kernel(monkeypatch):
    """The plumbing of measure_stage_times on CPU: the interpreter has no %globaltimer, so each
    whole call of the MLP-block kernel records made-up stamps (a decode call: 1 µs in stage 0,
    2 µs in stage 1; the prefill's calls, with more rows, ten times that); the figures per
    step are the instances a step times the decode calls' (the prefill's are left out)."""
    from kernels import mlp_block as module
    from profiling import measure

    real = module._launch

    def stamped(x2, *args):
        real(x2, *args)
        first, last = args[-2:]
        if module._recording and (first, last) == (0, 1):
            stamps = torch.tensor([[0, 1000, 1500, 3000], [200, 900, 1500, 2800]])
            module._recording[-1].append(stamps * (1 if x2.shape[0] == 1 else 10))

    monkeypatch.setattr(module, "_launch", stamped)
    monkeypatch.setattr(measure, "INTERPRETING", False)
    model = small_model()
    got = measure.measure_stage_times(model, measure.CPU_PLAN)
    assert list(got) == ["mlp_block"] and model.flags == model.default_flags()
    s = got["mlp_block"]
    layers = model.config.num_hidden_layers
    assert s["variant"] == "alt+mlp_block"
    assert s["calls"] == layers * measure.CPU_PLAN.launch_steps  # the profiled steps' calls
    assert s["stage_us_per_step"] == pytest.approx({"gate_up": layers * 1.0, "down": layers * 2.0})
    assert s["times"]["segments"]["mlp_block"]["instances_per_step"] == layers
