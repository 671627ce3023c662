"""Onboarding a GPU model (profiling/onboard.py): what it tunes, in which order it runs its
stages, what it skips and where it stops; the one-line note on a GPU with no tuned table.
The stages themselves (tune, record, bench, gate) run on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine import fusions as registry
from kernels import tuning
from kernels.runtime import gpu_slug
from profiling import onboard, tune
from profiling.kernel_timing import bench_sizes
from profiling.measure import Plan


def _tuned_pairs(commands) -> set[tuple[str, str]]:
    pairs = set()
    for cmd in commands:
        fusions = cmd[cmd.index("--fusions") + 1 : cmd.index("--sizes")]
        sizes = cmd[cmd.index("--sizes") + 1 : cmd.index("--buckets")]
        pairs |= {(f, s) for f in fusions for s in sizes}
    return pairs


def test_onboarding_tunes_every_tunable_fusion_at_every_size_the_bench_times():
    commands = onboard.tune_commands((1, 8), retune=False)
    expected = {
        (f.name, size)
        for f in registry.all_fusions()
        if f.kernel in tune.CANDIDATES
        for size in bench_sizes(f)
    }
    assert _tuned_pairs(commands) == expected
    assert all("--missing" in cmd for cmd in commands)
    assert all(cmd[cmd.index("--buckets") + 1 :][:2] == ["1", "8"] for cmd in commands)
    assert not any("--missing" in cmd for cmd in onboard.tune_commands((1,), retune=True))


def test_the_bench_times_fusions_with_a_peer_at_every_dense_size():
    sizes = {f.name: bench_sizes(f) for f in registry.all_fusions()}
    with_peer = [f.name for f in registry.all_fusions() if f.peers]
    assert with_peer, "the linear+residual steps have a one-launch peer"
    for name, s in sizes.items():
        assert len(s) == (4 if name in with_peer else 1), (name, s)


@pytest.fixture
def stages(monkeypatch):
    """Record the commands onboarding starts; each returns the exit code given for it."""
    ran, codes = [], {}

    def fake_run(cmd, **kwargs):
        ran.append(cmd)
        key = next((k for k in codes if k in cmd), None)
        return subprocess.CompletedProcess(cmd, codes.get(key, 0))

    monkeypatch.setattr(onboard.subprocess, "run", fake_run)
    return ran, codes


def _verbs(ran):
    return [c[2] if c[1] == "-m" and c[2] == "profiling.tune" else c[3] for c in ran]


def test_onboarding_runs_tune_record_bench_gate_in_that_order(stages, tmp_path):
    ran, _ = stages
    assert onboard.onboard(root=tmp_path, force=False, retune=False, log=lambda s: None) == 0
    verbs = _verbs(ran)
    n_tune = len(onboard.tune_commands(Plan().kernel_rows, retune=False))
    assert verbs == ["profiling.tune"] * n_tune + ["record", "bench", "gate"]
    assert all(c[0] == sys.executable for c in ran)
    assert all(str(tmp_path) in c for c in ran[n_tune:])


def test_onboarding_keeps_existing_baselines_unless_forced(stages, tmp_path):
    ran, _ = stages
    folder = tmp_path / gpu_slug()
    (folder / "machine").mkdir(parents=True)
    (folder / "baseline.json").write_text("{}")
    (folder / "machine" / "0001_kernels.json").write_text("{}")
    lines = []
    assert onboard.onboard(root=tmp_path, force=False, retune=False, log=lines.append) == 0
    assert "record" not in _verbs(ran) and "bench" not in _verbs(ran)
    assert any(line.startswith("record: skipped") for line in lines)
    ran.clear()
    assert onboard.onboard(root=tmp_path, force=True, retune=False, log=lambda s: None) == 0
    assert _verbs(ran)[-3:] == ["record", "bench", "gate"]


@pytest.mark.parametrize("failing", ["record", "gate"])
def test_onboarding_stops_at_the_first_failing_stage_with_its_exit_code(stages, tmp_path, failing):
    ran, codes = stages
    codes[failing] = 3 if failing == "record" else 1
    lines = []
    rc = onboard.onboard(root=tmp_path, force=False, retune=False, log=lines.append)
    assert rc == codes[failing]
    assert _verbs(ran)[-1] == failing
    assert any(f"STOPPED at {failing}" in line for line in lines)


def test_the_untuned_note_names_the_kernels_without_a_table_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    kernels = sorted({f.kernel for f in registry.all_fusions() if tune.tunable(f)})
    note = onboard.untuned_note()
    assert note is not None and "python -m profiling onboard" in note
    assert all(k in note for k in kernels)
    (tmp_path / kernels[0]).mkdir()
    (tmp_path / kernels[0] / f"{gpu_slug()}.json").write_text("{}")
    listed = onboard.untuned_note().split("(", 1)[1].split(")", 1)[0].split(", ")
    assert listed == kernels[1:]
    for k in kernels[1:]:
        (tmp_path / k).mkdir()
        (tmp_path / k / f"{gpu_slug()}.json").write_text("{}")
    assert onboard.untuned_note() is None


def test_a_resumed_tuning_skips_the_buckets_the_table_holds(monkeypatch, tmp_path):
    from engine.config import default_config

    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    fusion = next(f for f in registry.all_fusions() if tune.tunable(f))
    assert tune.tuned_buckets(fusion, default_config(), "bfloat16") == set()
    c = default_config()
    N, K = tune._kernel_shape(fusion, tune.span_ops(tune._program(c), fusion), c)
    path = tmp_path / fusion.kernel / f"{gpu_slug()}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"timings": {f"{N}x{K}": {"bfloat16": {"8": {"best_us": 1.0}}}}}))
    assert tune.tuned_buckets(fusion, c, "bfloat16") == {8}
    assert tune.tuned_buckets(fusion, c, "float16") == set()


def test_onboarding_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU onboarding runs")
    from profiling.__main__ import main

    assert main(["onboard"]) == 2
    assert "onboarding needs a CUDA GPU" in capsys.readouterr().err
