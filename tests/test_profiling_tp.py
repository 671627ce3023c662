"""The profiling suite over tensor-parallel ranks (``torchrun -m profiling``, profiling/ranks.py).

CPU, gloo, two processes through the real torchrun: measure writes one run.json, from rank 0
alone, with the TP size and every rank's launch plan (equal across ranks, each fusion's exact
saving); only rank 0 prints. A --tp that is not the world size is a one-line error, exit 2.
Baselines of a TP size live in their own folder (perf_baselines/<gpu-slug>/tpN/) and never
gate a run with another rank count. Kernel timing, launch counts and CUDA-graph decode need
GPUs (scripts/gpu_pass.sh, steps tp and tpgate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tp_workers
from gate_helpers import small_model, synthetic_report

from profiling import baselines
from profiling.baselines import BaselineMismatch, BaselineMissing, make_baseline

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if name not in extra:
            env.pop(name, None)
    return env


def _two_gloo_ranks(command: str, *args: str, cwd: Path):
    """``torchrun --nproc-per-node 2 -m profiling COMMAND --tp 2 ARGS`` (gloo on CPU)."""
    return subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(tp_workers.free_port()), "-m", "profiling", command, "--tp", "2",
            *args,
        ],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """One real launch: torchrun, two ranks, gloo, profiling measure on the small model."""
    if torch.cuda.is_available():
        pytest.skip("the CPU (gloo) launch; on GPUs `scripts/gpu_pass.sh tp` measures over NCCL")
    out = tmp_path_factory.mktemp("tp-measure")
    result = _two_gloo_ranks("measure", "--seed", "5", "--out", str(out / "run"), cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def test_one_run_from_rank_0_records_the_tp_size_and_every_rank(tp_run):
    result, out = tp_run
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["run", "run/run.json"]
    assert result.stdout.count("wrote ") == 1, result.stdout
    assert result.stdout.count("numerics inputs: seed 5") == 1, result.stdout
    assert "Traceback" not in result.stderr
    run = json.loads((out / "run" / "run.json").read_text())
    assert run["model"]["tp"] == 2 and run["tp"]["world_size"] == 2
    assert run["tp"]["backend"] == "gloo"
    # The whole model's dimensions; each rank holds half the heads and MLP rows.
    full, local = run["model"]["config"], run["tp"]["local_config"]
    assert local["num_attention_heads"] * 2 == full["num_attention_heads"]
    assert local["intermediate_size"] * 2 == full["intermediate_size"]
    ranks = run["tp"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["launches"] and ranks[0]["launches"] == ranks[1]["launches"]
    assert run["tp"]["launches_equal"] and run["tp"]["launch_differences"] == []
    assert run["tp"]["not_applicable"] == ["o_proj_residual", "down_proj_residual", "mlp_block"]
    assert "o_proj_residual" not in run["model"]["default_fusions"]


def test_each_default_fusion_saves_its_exact_launches_on_every_rank(tp_run):
    """segments(none) - segments(default) = sum over default fusions of instances x (span ops
    - 1): the launch plan each rank runs, from the run's own model summary."""
    _, out = tp_run
    run = json.loads((out / "run" / "run.json").read_text())
    fusions = run["model"]["fusions"]
    expected = sum(
        fusions[name]["instances_per_step"] * (fusions[name]["span_ops"] - 1)
        for name in run["model"]["default_fusions"]
    )
    assert expected > 0
    for rank in run["tp"]["ranks"]:
        launches = rank["launches"]
        assert launches["segments/none"] - launches["segments/default"] == expected


def test_tp_numerics_ran_per_rank_and_the_collective_fusion_says_why_not(tp_run):
    _, out = tp_run
    run = json.loads((out / "run" / "run.json").read_text())
    by_name = {}
    for r in run["numerics"]:
        by_name.setdefault(r["name"], []).append(r)
    assert all(r["ok"] for r in run["numerics"])
    assert "norm_qkv_proj.qkv" in by_name and "engine.logits" in by_name
    assert "skipped" not in by_name["engine.logits"][0]  # the whole model, vs an fp32 copy
    (ar,) = by_name["all_reduce_residual.residual"]  # gloo/CPU: its kernel cannot run
    assert "kernel unavailable" in ar["skipped"]
    assert "o_proj_residual.residual" not in by_name
    for stage in ("launches", "kernel_ratios", "e2e"):
        assert "needs a CUDA GPU" in run[f"{stage}_note"]


def test_a_cpu_run_is_never_recorded(tp_run, tmp_path):
    _, out = tp_run
    result = subprocess.run(
        [sys.executable, "-m", "profiling", "record", "--root", str(tmp_path), "--combine",
         str(out / "run" / "run.json")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nothing to record" in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--tp", "2"], {}),  # no torchrun: WORLD_SIZE 1
        (["--tp", "3"], {"WORLD_SIZE": "2", "RANK": "0"}),
    ],
)
def test_tp_other_than_the_world_size_is_a_one_line_error(args, env):
    result = subprocess.run(
        [sys.executable, "-m", "profiling", "measure", *args],
        cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    world = env.get("WORLD_SIZE", "1")
    assert lines[0].startswith(f"error: {args[0]} {args[1]} but WORLD_SIZE is {world}")


def test_each_tp_size_has_its_own_baseline_folder(tmp_path):
    model = small_model()
    one = synthetic_report(seed=1, model=model)
    two = synthetic_report(seed=1, model=model)
    two["model"]["tp"] = 2
    slug = one["gpu_slug"]
    assert baselines.baseline_path(slug, tmp_path) == tmp_path / slug / "baseline.json"
    path, _ = baselines.write_baseline(two, root=tmp_path)
    assert path == tmp_path / slug / "tp2" / "baseline.json"
    with pytest.raises(BaselineMissing, match="torchrun --nproc-per-node 3"):
        baselines.load_baseline(slug, root=tmp_path, tp=3)
    with pytest.raises(BaselineMissing):
        baselines.load_baseline(slug, root=tmp_path)  # TP=1 has none yet
    assert baselines.load_baseline(slug, root=tmp_path, tp=2)["model"]["tp"] == 2
    # A run on another rank count is never compared with it.
    with pytest.raises(BaselineMismatch, match="tensor parallel over 1 rank"):
        baselines.check_comparable(one, make_baseline(two))


def test_aligned_ranks_start_their_timers_together(tmp_path):
    """A rank that comes late (a longer gc.collect, a slower host) must not start its peers'
    timers early: after align() the ranks' clocks read within a few ms of each other."""
    late = 0.4
    ranks = tp_workers.run_ranks(tp_workers.aligned_clocks, tmp_path, late)
    gap = abs(ranks[0]["after"].item() - ranks[1]["after"].item())
    assert gap < 0.05, f"rank 0 left align() {gap:.3f} s apart from the late rank"


def test_the_report_breaks_each_ranks_step_down(tmp_path):
    """Each rank's own step times (shards and collective waits differ by rank), one column per
    rank and variant."""
    if torch.cuda.is_available():
        pytest.skip("the CPU (gloo) launch; on GPUs `scripts/gpu_pass.sh` runs the TP report")
    result = _two_gloo_ranks(
        "report", "--seed", "3", "--out", str(tmp_path / "report"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    per_rank = report["breakdown_per_rank"]
    assert len(per_rank) == 2
    for bd in per_rank:
        assert set(bd) == {"default", "none"}
        names = {r["name"] for r in bd["default"]["rows"]}
        assert {"norm_qkv_proj", "o_proj_all_reduce", "down_proj_all_reduce"} <= names
        assert all(r["us_per_step"] > 0 for r in bd["default"]["rows"])
    assert "default r0 µs" in result.stdout and "default r1 µs" in result.stdout
