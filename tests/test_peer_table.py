"""scripts.peer_table: best peer / fused from saved kernel benchmarks, per step, size and row
count, one column per file; steps timed at one size only are left out. The benchmark's
torch_compile peer computes what the span's unfused ops compute."""

from __future__ import annotations

import json
import random

import pytest
import torch
from engine_helpers import small_config

from engine import fusions as registry
from engine.program import draw_inputs, run_unfused, span_ops
from engine.qwen3 import Qwen3ForCausalLM
from profiling.kernel_timing import compiled_span
from scripts import peer_table


def _bench_json(path, times):
    benchmarks = [
        {
            "extra_info": {
                "fusion": fusion,
                "size": size,
                "M": M,
                "path": "gemv",
                "us_per_call": us,
            }
        }
        for (fusion, size, M), us in times.items()
    ]
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_the_ratio_is_the_fastest_peer_over_the_fused_call(tmp_path):
    rng = random.Random()
    times = {}
    for size in ("0.6b", "8b"):
        for M in (1, 8, 64):
            times[("o_proj_residual", size, M)] = {
                "fused": rng.uniform(2, 20),
                "unfused": rng.uniform(2, 20),
                "addmm_": rng.uniform(2, 20),
            }
    times[("norm_qkv_proj", "0.6b", 1)] = {"fused": 3.0, "unfused": 5.0}
    a = _bench_json(tmp_path / "a.json", times)
    rows = peer_table.table([a], {1, 8})
    assert {(r["fusion"], r["size"], r["M"]) for r in rows} == {
        ("o_proj_residual", s, M) for s in ("0.6b", "8b") for M in (1, 8)
    }
    for row in rows:
        us = times[(row["fusion"], row["size"], row["M"])]
        run = row["runs"][0]
        best = min(us["unfused"], us["addmm_"])
        assert run["best_over_fused"] == best / us["fused"]
        assert us[run["best_peer"]] == best


def test_each_file_is_a_column_and_a_missing_row_is_a_dash(tmp_path, capsys):
    t = {("o_proj_residual", s, 1): {"fused": 2.0, "addmm_": 3.0} for s in ("0.6b", "8b")}
    a = _bench_json(tmp_path / "a.json", t)
    b = _bench_json(tmp_path / "b.json", {k: v for k, v in t.items() if k[1] == "8b"})
    assert peer_table.main([str(a), str(b), "--labels", "heuristic", "tuned"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "heuristic: peer/fused" in out[0] and "tuned: peer/fused" in out[0]
    row_06 = next(line for line in out if line.startswith("o_proj_residual  0.6b"))
    assert row_06.rstrip().endswith("-") and "1.50" in row_06


def test_a_file_that_is_not_a_benchmark_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert peer_table.main([str(bad)]) == 2
    assert "not a kernel benchmark JSON" in capsys.readouterr().err


@pytest.mark.parametrize("fusion", [f.name for f in registry.all_fusions() if f.peers])
def test_the_torch_compile_peer_computes_the_span(fusion, device):
    """The kernel benchmark's torch_compile peer (compiled torch formulas of the span) gives
    what the span's unfused ops give, on fresh inputs."""
    config = small_config(num_hidden_layers=1)
    with torch.device("meta"):
        program = Qwen3ForCausalLM(config).program()
    ops = span_ops(program, registry.get(fusion))
    inputs = draw_inputs(ops, config, 3, torch.float32, device)
    want = run_unfused(ops, {k: v.clone() for k, v in inputs.items()})[ops[-1].writes]
    got = compiled_span(ops)(inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
