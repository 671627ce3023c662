"""scripts.runs reads a GPU pass's figures from its files, and results/runs.jsonl is well formed."""

from __future__ import annotations

import json
import random

from scripts import runs


def _pass_folder(tmp_path, rng):
    """A pass folder as scripts/gpu_pass.sh writes it, with fresh random figures."""
    checks, seconds = rng.randint(100, 300), rng.randint(10, 90)
    passed, skipped = rng.randint(100, 900), rng.randint(1, 40)
    tok_s = round(rng.uniform(500, 2000), 1)
    day = rng.randint(1, 28)
    (tmp_path / "env.log").write_text(
        f"Wed Nov {day} 10:51:16 PM UTC 2026\n"
        "| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: 13.0 |\n"
        "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:06.0 Off |        0 |\n"
        "torch 2.11.0+cu130 triton 3.6.0\ncommit abc1234\n"
    )
    (tmp_path / "gate.log").write_text(
        f"numerics inputs: seed 1\ngate: PASS ({checks} checks: flags 1)\ngate time: {seconds} s\n"
    )
    (tmp_path / "check.log").write_text(f"....\n{passed} passed, {skipped} skipped in 12.34s\n")
    (tmp_path / "ab1.json").write_text(
        json.dumps({"base": "_old", "summary": {"1": {"base": tok_s, "new": 2 * tok_s,
                                                      "new/base": 2.0}}})
    )  # fmt: skip
    return checks, seconds, passed, skipped, tok_s, f"2026-11-{day:02d}"


def test_figures_are_read_from_the_pass_files(tmp_path):
    rng = random.Random()
    checks, seconds, passed, skipped, tok_s, date = _pass_folder(tmp_path, rng)
    assert runs.environment(tmp_path)["date"] == date
    rec = runs.line(tmp_path, name="x", date="2026-11-25", commit="abc1234", command="c")
    assert rec["gpus"] == ["NVIDIA H100 80GB HBM3"]
    assert (rec["driver"], rec["torch"], rec["triton"]) == ("580.159.04", "2.11.0+cu130", "3.6.0")
    assert "logs_commit" not in rec  # the logs name the commit given
    f = rec["figures"]
    assert f["gate"] == {"verdict": "PASS", "checks": checks, "seconds": seconds}
    assert f["check"] == {"passed": passed, "skipped": skipped, "seconds": 12.3}
    assert f["ab1"]["b1"] == {"base": tok_s, "new": round(2 * tok_s, 1), "new/base": 2.0}


def test_a_run_cut_short_counts_its_progress_and_says_so(tmp_path):
    (tmp_path / "tptests.log").write_text("ssss....F..F\n")
    assert runs.figures(tmp_path)["tptests"] == {"cut_short": True, "passed": 6, "failed": 2}


def test_append_refuses_a_second_line_of_the_same_name(tmp_path):
    path = tmp_path / "runs.jsonl"
    runs.append({"run": "a", "figures": {}}, path)
    try:
        runs.append({"run": "a", "figures": {}}, path)
    except ValueError as e:
        assert "already" in str(e)
    else:
        raise AssertionError("a duplicate run name was appended")
    assert len(runs.read(path)) == 1


def test_the_committed_record_is_one_run_a_line():
    records = runs.read()
    names = [r["run"] for r in records]
    assert len(names) == len(set(names)), "run names repeat"
    for r in records:
        assert {"run", "date", "gpus", "commit", "command", "figures"} <= r.keys(), r["run"]
        assert r["gpus"] and all(g for g in r["gpus"]), r["run"]


def test_the_bench_verdict_is_read_from_the_table_bench_prints():
    import random

    from profiling import gate
    from scripts.runs import bench_verdict

    rng = random.Random()
    rows = []
    for i, path in enumerate(("gemv", "triton", "gemv")):
        saved = rng.uniform(0.1, 0.9)
        change = rng.uniform(-0.2, 0.2)
        rows.append(
            {"name": f"test_fusion_kernel[step-0.6b-m{i}]", "path": path, "reference": "unfused",
             "saved": saved, "current": saved * (1 + change), "change": change, "limit": 0.05,
             "verdict": "SLOWER" if change > 0.05 else "ok"}
        )  # fmt: skip
    slower = sum(r["verdict"] == "SLOWER" for r in rows)
    text = gate.kernel_bench_table(rows) + f"\n\nbench: {'FAIL' if slower else 'PASS'} "
    text += f"({slower} of {len(rows)} slower)\n"
    got = bench_verdict(text)
    assert got["slower"] == slower and got["benchmarks"] == len(rows)
    for r in rows:
        g = got["rows"][r["name"]]
        assert g["verdict"] == r["verdict"] and g["path"] == r["path"]
        assert abs(g["change_pct"] - 100 * r["change"]) < 0.006
