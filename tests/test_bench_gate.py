"""The kernel benchmark's verdict (python -m profiling bench, profiling/gate.py): each
benchmark's fused / reference ratio, both timed in one process, against the saved run's, with a
limit from the saved run's own spread; rows on cuBLAS's path are shown, not gated."""

from __future__ import annotations

import copy
import random

from profiling import gate


def _run(rng: random.Random, names: list[tuple[str, str]], spread: float = 0.01) -> dict:
    """A pytest-benchmark JSON of fresh random times: (name, path) per benchmark."""
    benchmarks = []
    for name, path in names:
        fused = rng.uniform(2, 40)
        median = rng.uniform(1e-3, 5e-3)
        benchmarks.append(
            {
                "name": name,
                "stats": {"median": median, "iqr": spread * median},
                "extra_info": {
                    "path": path,
                    "us_per_call": {
                        "fused": fused,
                        "unfused": fused * rng.uniform(1.2, 5),
                        "addmm_": fused * rng.uniform(1.1, 4),
                    },
                },
            }
        )
    return {"benchmarks": benchmarks}


def _scale(run: dict, name: str, factor: float, who: str = "fused") -> None:
    for b in run["benchmarks"]:
        if b["name"] == name:
            b["extra_info"]["us_per_call"][who] *= factor


NAMES = [
    ("o_proj-m1", "gemv"),
    ("o_proj-m8", "gemv"),
    ("norm-m1", "triton"),
    ("o_proj-m512", "cublas"),
]


def _verdicts(saved, current) -> dict[str, str]:
    return {r["name"]: r["verdict"] for r in gate.compare_kernel_benchmarks(saved, current)}


def test_a_ten_percent_slower_fused_kernel_fails_and_nothing_else_does():
    rng = random.Random()
    saved = _run(rng, NAMES)
    current = copy.deepcopy(saved)
    for b in current["benchmarks"]:  # drift that moves every implementation alike
        b["extra_info"]["us_per_call"] = {
            k: v * 1.07 for k, v in b["extra_info"]["us_per_call"].items()
        }
    slow = rng.choice(["o_proj-m1", "o_proj-m8", "norm-m1"])
    _scale(current, slow, 1.10)
    verdicts = _verdicts(saved, current)
    assert verdicts[slow] == "SLOWER"
    assert all(v == "ok" for n, v in verdicts.items() if n not in (slow, "o_proj-m512"))


def test_a_change_within_the_limit_passes_and_a_faster_kernel_never_fails():
    rng = random.Random()
    saved = _run(rng, NAMES)
    current = copy.deepcopy(saved)
    _scale(current, "o_proj-m1", 1 + 0.9 * gate.KERNEL_BENCH_FLOOR)
    _scale(current, "o_proj-m8", 0.5)
    _scale(current, "norm-m1", 1.3, who="unfused")  # the reference slower: the ratio falls
    assert set(_verdicts(saved, current).values()) <= {"ok", gate.NOT_GATED_CUBLAS}


def test_the_limit_widens_with_the_saved_runs_spread():
    rng = random.Random()
    saved = _run(rng, NAMES, spread=0.04)  # 3 x 4% = 12%
    current = copy.deepcopy(saved)
    _scale(current, "o_proj-m1", 1.10)
    _scale(current, "o_proj-m8", 1.13)
    rows = {r["name"]: r for r in gate.compare_kernel_benchmarks(saved, current)}
    assert abs(rows["o_proj-m1"]["limit"] - 0.12) < 1e-9
    assert rows["o_proj-m1"]["verdict"] == "ok" and rows["o_proj-m8"]["verdict"] == "SLOWER"


def test_cublas_rows_and_new_benchmarks_are_shown_not_gated():
    rng = random.Random()
    saved = _run(rng, NAMES)
    current = copy.deepcopy(saved)
    _scale(current, "o_proj-m512", 1.5)
    current["benchmarks"].append(_run(rng, [("new-m1", "gemv")])["benchmarks"][0])
    verdicts = _verdicts(saved, current)
    assert verdicts["o_proj-m512"] == gate.NOT_GATED_CUBLAS
    assert verdicts["new-m1"] == "not in the saved run"
    table = gate.kernel_bench_table(gate.compare_kernel_benchmarks(saved, current))
    assert "new-m1" in table and "+50.00%" in table


def test_the_reference_is_the_unfused_ops_else_the_first_peer():
    rng = random.Random()
    saved = _run(rng, [("oop-m1", "gemv")])
    del saved["benchmarks"][0]["extra_info"]["us_per_call"]["unfused"]
    us = saved["benchmarks"][0]["extra_info"]["us_per_call"]
    row = gate.kernel_bench_rows(saved)["oop-m1"]
    assert row["reference"] == "addmm_" and row["ratio"] == us["fused"] / us["addmm_"]
