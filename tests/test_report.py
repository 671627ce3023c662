"""The report (python -m profiling): written on CPU with every section a CPU can fill (the
breakdown from host times, marked meaningless); tables and plot on synthetic runs."""

from __future__ import annotations

import json

import pytest
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
