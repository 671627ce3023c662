"""The regression gate is itself tested.

CPU: the comparison on synthetic runs of the gate's stages (tests/gate_helpers.py): unchanged
performance passes; each regression fails its stage (default flags, launches, numerics, a 5%
slower fused step, tok/s, half the gain lost); limits come from the measured spread, within
their stated floors and caps; baselines are validated before use, never replaced silently.
GPU (timing, never inside pytest-xdist workers): unchanged code passes the gate against this
GPU's stored baseline. The planted regressions run on the GPU through scripts/gate_proof.py.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from gate_helpers import H100, H200, small_model, synthetic_report

from engine import fusions as registry
from profiling import baselines
from profiling.baselines import (
    BaselineCorrupt,
    BaselineMismatch,
    BaselineMissing,
    ForeignBaseline,
    NotYetBaselined,
    load_baseline,
    make_baseline,
    validate,
    write_baseline,
)
from profiling.gate import compare


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def baseline(model):
    return make_baseline(synthetic_report(seed=1, model=model))


def _failed(result) -> set[str]:
    return result.failed_stages()


@pytest.mark.parametrize("seed", range(4))
def test_unchanged_performance_passes(model, baseline, seed):
    result = compare(synthetic_report(seed=100 + seed, model=model), baseline)
    assert result.ok, result.summary()
    stages = {c.stage for c in result.checks}
    assert stages == {"flags", "launches", "kernel_ratio", "tok_s", "speedup"}


def test_every_fusion_has_gated_checks_in_every_stage(model, baseline):
    result = compare(synthetic_report(seed=2, model=model), baseline)
    for fusion in baseline["model"]["fusions"]:
        assert any(c.stage == "kernel_ratio" and c.key.startswith(fusion) for c in result.checks)
        assert any(c.stage == "speedup" and c.key.endswith(f".{fusion}") for c in result.checks)
        assert any(c.stage == "launches" and f".{fusion}" in c.key for c in result.checks)


def test_default_fusions_changed_fails_on_flags(model, baseline):
    current = synthetic_report(seed=3, model=model)
    current["model"]["default_fusions"].remove("o_proj_residual")
    assert "flags" in _failed(compare(current, baseline))


@pytest.mark.parametrize("segment", ["o_proj_residual", "down_proj_residual", "o_proj"])
def test_an_extra_kernel_per_instance_fails_on_launches(model, baseline, segment):
    result = compare(synthetic_report(seed=4, model=model, extra_kernels={segment: 1}), baseline)
    assert _failed(result) == {"launches"}
    assert any(segment in c.key for c in result.failures)


def test_a_segment_the_baseline_never_ran_fails(model, baseline):
    current = synthetic_report(seed=5, model=model)
    key = "default/graph-b1"
    current["launches"][key]["segments"]["mystery"] = {"instances": 4, "per_instance": 1.0}
    result = compare(current, baseline)
    assert any(c.key == f"{key}.mystery" for c in result.failures)


def test_launch_savings_must_match_the_config(model, baseline):
    current = synthetic_report(seed=6, model=model)
    # The all-unfused count rises by one: every variant now saves one kernel more than the
    # registry says its fusions save.
    current["launches"]["none/graph-b1"]["kernels_per_step"] += 1
    result = compare(current, baseline)
    assert any(c.key.endswith(".saved") for c in result.failures)


@pytest.mark.parametrize("fusion", ["o_proj_residual", "norm_gate_up_silu", "add_rms_norm"])
def test_a_fused_step_5_percent_slower_fails_on_kernel_ratio(model, baseline, fusion):
    result = compare(synthetic_report(seed=7, model=model, ratio_scale={fusion: 1.05}), baseline)
    assert _failed(result) == {"kernel_ratio"}
    assert all(c.key.startswith(fusion) for c in result.failures)
    within = compare(synthetic_report(seed=7, model=model, ratio_scale={fusion: 1.01}), baseline)
    assert within.ok, within.summary()


@pytest.mark.parametrize("op", ["attention", "qk_norm_rope", "lm_head", "embed", "final_norm"])
def test_an_op_the_step_runs_alone_5_percent_slower_fails_on_kernel_ratio(model, baseline, op):
    result = compare(synthetic_report(seed=7, model=model, ratio_scale={op: 1.05}), baseline)
    assert _failed(result) == {"kernel_ratio"}
    assert {c.key for c in result.failures} == {f"{op}/m1/copy", f"{op}/m8/copy"}


def test_every_kernel_of_the_default_step_has_a_gated_kernel_ratio(model, baseline):
    """Each segment of the default step (a fusion, or an op alone) has a kernel-time check."""
    gated = {
        c.key.split("/")[0]
        for c in compare(synthetic_report(seed=2, model=model), baseline).checks
        if c.stage == "kernel_ratio"
    }
    assert {s.name for s in model.segments()} <= gated


def test_kernel_ratios_the_baseline_lacks_are_named_in_a_note(model):
    old = make_baseline(synthetic_report(seed=1, model=model, op_ratios=False))
    result = compare(synthetic_report(seed=8, model=model), old)
    assert result.ok, result.summary()
    (note,) = [n for n in result.notes if "not in the baseline" in n]
    assert "attention/m1/copy" in note and "profiling record" in note
    assert not [
        n
        for n in compare(
            synthetic_report(seed=8, model=model),
            make_baseline(synthetic_report(seed=1, model=model)),
        ).notes
        if "not in the baseline" in n
    ]


def test_default_tok_s_below_its_tolerance_fails(model, baseline):
    tol = baseline["e2e"]["b1"]["variants"]["default"]["tolerance"]
    slower = synthetic_report(seed=8, model=model, default_tok_s=1000 * (1 - 1.5 * tol))
    assert "tok_s" in _failed(compare(slower, baseline))
    within = synthetic_report(seed=8, model=model, default_tok_s=1000 * (1 - tol / 3))
    assert "tok_s" not in _failed(compare(within, baseline))


@pytest.mark.parametrize("pairing", ["all", "o_proj_residual", "add_rms_norm"])
def test_half_the_gain_lost_fails_on_speedup(model, baseline, pairing):
    stored = 0.5 if pairing == "all" else 0.1
    halved = synthetic_report(seed=9, model=model, gain={pairing: stored / 2})
    result = compare(halved, baseline)
    assert _failed(result) == {"speedup"}
    assert all(c.key.endswith(f".speedup.{pairing}") for c in result.failures)


def test_numerics_failure_fails_the_gate(model, baseline):
    current = synthetic_report(seed=10, model=model)
    current["numerics"] = [
        {"name": "o_proj_residual.residual", "dtype": "bfloat16", "rows": 1, "max_abs": 0.01,
         "unfused_max_abs": 0.004, "ok": False, "failures": ["12 elements exceed"]},
    ]  # fmt: skip
    assert _failed(compare(current, baseline)) == {"numerics"}


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


def test_every_tolerance_is_positive_bounded_and_below_the_effect(baseline):
    for key, e in baseline["kernel_ratios"].items():
        assert 0 < e["tolerance"] < 0.05, key  # a 5% slower step must fail
        assert e["max"] == pytest.approx(e["ratio"] * (1 + e["tolerance"]))
    for b in baseline["e2e"].values():
        d = b["variants"]["default"]
        assert 0 < d["tolerance"] <= 0.10
        for name, s in b["speedups"].items():
            assert s["gated"], (name, s)
            gain = s["median"] - 1
            assert 0 < s["tolerance"] <= 0.45 * gain
            assert s["floor"] > 1 + gain / 2, name  # losing half the gain fails


def test_tolerances_follow_the_measured_spread(model):
    quiet = make_baseline(synthetic_report(seed=11, model=model, noise=0.0005))
    noisy = make_baseline(synthetic_report(seed=11, model=model, noise=0.06))
    key = "o_proj_residual/m1/unfused"
    assert quiet["kernel_ratios"][key]["tolerance"] == baselines.KERNEL_RATIO_FLOOR
    assert noisy["kernel_ratios"][key]["tolerance"] > quiet["kernel_ratios"][key]["tolerance"]
    assert noisy["kernel_ratios"][key]["tolerance"] <= baselines.KERNEL_RATIO_CAP
    q, n = quiet["e2e"]["b1"]["variants"]["default"], noisy["e2e"]["b1"]["variants"]["default"]
    assert q["tolerance"] == baselines.TOK_S_FLOOR < n["tolerance"] <= baselines.TOK_S_CAP


def test_a_gain_within_its_noise_is_not_gated_and_says_why(model):
    noisy = make_baseline(
        synthetic_report(seed=12, model=model, noise=0.03, gain={"add_rms_norm": 0.01})
    )
    entry = noisy["e2e"]["b1"]["speedups"]["add_rms_norm"]
    assert entry["gated"] is False and "noise" in entry["reason"]
    result = compare(synthetic_report(seed=13, model=model, noise=0.03), noisy)
    assert any("add_rms_norm" in n and "not gated" in n for n in result.notes)


def test_no_baseline_from_a_cpu_run(model):
    cpu = synthetic_report(seed=14, model=model)
    cpu.update(gpu="cpu", gpu_slug="cpu", interpreted=True)
    with pytest.raises(ValueError, match="CPU"):
        make_baseline(cpu)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_write_then_load_round_trip(model, tmp_path):
    path, replaced = write_baseline(synthetic_report(seed=15, model=model), root=tmp_path)
    assert path == tmp_path / H100[1] / "baseline.json" and replaced is None
    loaded = load_baseline(H100[1], root=tmp_path)
    assert compare(synthetic_report(seed=16, model=model), loaded).ok


def test_missing_baseline_says_how_to_record_one(tmp_path):
    with pytest.raises(BaselineMissing, match="python -m profiling record"):
        load_baseline(H100[1], root=tmp_path)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d.update(schema="fusionguard-throughput-baseline/1"), "schema"),
        (lambda d: d["kernel_ratios"]["o_proj_residual/m1/unfused"].update(ratio="0.5"), "ratio"),
        (lambda d: d["kernel_ratios"]["o_proj_residual/m1/unfused"].update(tolerance=-0.64),
         "tolerance"),
        (lambda d: d["e2e"]["b1"]["variants"]["default"].update(tolerance=0.64), "default"),
        (lambda d: d["e2e"]["b1"]["speedups"]["all"].update(floor=0.997), "floor > 1"),
        (lambda d: d["launches"]["default/graph-b1"].update(kernels_per_step=None), "count"),
        (lambda d: d["launches"]["default/graph-b1"]["segments"]["o_proj_residual"].pop(
            "per_instance"), "per_instance"),
        (lambda d: d["plan"].update(batches="1,8"), "plan.batches"),
        (lambda d: d["model"].update(default_fusions="o_proj_residual"), "default_fusions"),
    ],
)  # fmt: skip
def test_malformed_baseline_is_refused_naming_the_field(model, tmp_path, edit, named):
    path, _ = write_baseline(synthetic_report(seed=17, model=model), root=tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    assert any(named in p for p in validate(data)), validate(data)
    with pytest.raises(BaselineCorrupt, match="re-record"):
        load_baseline(H100[1], root=tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[]", "null"])
def test_unreadable_baseline_is_refused(tmp_path, content):
    (tmp_path / H100[1]).mkdir()
    (tmp_path / H100[1] / "baseline.json").write_text(content)
    with pytest.raises(BaselineCorrupt):
        load_baseline(H100[1], root=tmp_path)


def test_foreign_gpu_baseline_never_compares(model, tmp_path):
    path, _ = write_baseline(synthetic_report(seed=18, model=model), root=tmp_path)
    (tmp_path / H200[1]).mkdir()
    (tmp_path / H200[1] / "baseline.json").write_text(path.read_text())
    with pytest.raises(ForeignBaseline, match="never gate another"):
        load_baseline(H200[1], root=tmp_path)
    with pytest.raises(ForeignBaseline):
        compare(
            synthetic_report(seed=19, model=model, gpu=H200), load_baseline(H100[1], root=tmp_path)
        )


def test_another_model_or_plan_is_a_mismatch(model, baseline):
    deeper = synthetic_report(seed=20, model=small_model(layers=5))
    with pytest.raises(BaselineMismatch, match="config"):
        compare(deeper, baseline)
    other_plan = synthetic_report(seed=21, model=model)
    other_plan["plan"]["prompt_len"] = 32
    with pytest.raises(BaselineMismatch, match="prompt_len"):
        compare(other_plan, baseline)
    new_fusion = synthetic_report(seed=22, model=model)
    new_fusion["model"]["fusions"]["toy"] = dict(new_fusion["model"]["fusions"]["add_rms_norm"])
    with pytest.raises(NotYetBaselined, match="not yet baselined: toy .*--force"):
        compare(new_fusion, baseline)
    gone = synthetic_report(seed=22, model=model)
    del gone["model"]["fusions"]["add_rms_norm"]
    with pytest.raises(BaselineMismatch, match="gone: add_rms_norm") as raised:
        compare(gone, baseline)
    assert not isinstance(raised.value, NotYetBaselined)


def test_record_refuses_to_replace_another_model_unless_forced(model, tmp_path):
    write_baseline(synthetic_report(seed=23, model=model), root=tmp_path)
    other = synthetic_report(seed=24, model=small_model(layers=5))
    with pytest.raises(BaselineMismatch, match="--force"):
        write_baseline(other, root=tmp_path)
    assert load_baseline(H100[1], root=tmp_path)["model"]["config"]["num_hidden_layers"] == 4
    _path, replaced = write_baseline(other, root=tmp_path, force=True)
    assert "tok/s" in replaced and "commit" in replaced
    assert load_baseline(H100[1], root=tmp_path)["model"]["config"]["num_hidden_layers"] == 5
    # Same model and plan: replaced without --force, and said so.
    _, replaced = write_baseline(
        synthetic_report(seed=25, model=small_model(layers=5)), root=tmp_path
    )
    assert replaced is not None


def test_record_refuses_to_overwrite_an_unusable_file_unless_forced(model, tmp_path):
    (tmp_path / H100[1]).mkdir()
    (tmp_path / H100[1] / "baseline.json").write_text("{}")
    with pytest.raises(BaselineCorrupt, match="--force"):
        write_baseline(synthetic_report(seed=26, model=model), root=tmp_path)
    write_baseline(synthetic_report(seed=26, model=model), root=tmp_path, force=True)


def _committed_baselines() -> list:
    """The single-process baselines in perf_baselines/ (skips while there are none)."""
    files = sorted(baselines.BASELINE_ROOT.glob(f"*/{baselines.BASELINE_FILE}"))
    if not files:
        pytest.skip("no baseline committed yet")
    return files


def test_the_committed_baseline_is_usable_and_gates_every_fusion():
    """perf_baselines/ holds only files the tool wrote; each must validate and cover the
    registered fusions (or the gate would exit 3)."""
    from engine import fusions as registry

    files = _committed_baselines()
    for path in files:
        data = json.loads(path.read_text())
        assert validate(data) == [], path
        registered = {f.name for f in registry.all_fusions()}
        assert set(data["model"]["fusions"]) <= registered, f"{path}: gates a fusion gone"
        _report_not_yet_baselined(path, data["model"], {"fusions": registered})
        for key, e in data["kernel_ratios"].items():
            assert 0 < e["tolerance"] <= baselines.KERNEL_RATIO_CAP, key


def test_the_committed_baseline_describes_the_code_as_it_is():
    """A baseline gates the model and fusions it was recorded with: a fusion switched off by
    default, a span, instance or kernel count changed in the code without re-recording fails
    here on CPU (on a GPU the gate's flags and launch checks fail too)."""
    from engine.config import default_config
    from engine.qwen3 import Qwen3ForCausalLM, on_meta
    from profiling.measure import model_summary

    files = _committed_baselines()
    for path in files:
        stored = json.loads(path.read_text())["model"]
        config = default_config().replace(**stored["config"])
        with on_meta(getattr(torch, stored["dtype"])):
            model = Qwen3ForCausalLM(config)
        _assert_describes(path, stored, model_summary(model))


def test_the_committed_tp_baselines_describe_the_code_as_it_is():
    """The same for perf_baselines/<gpu>/tpN/: rank 0's sharded model, built on meta with the
    TP-only fusions registered (as every TP process does), against the stored summary."""
    from engine.config import default_config
    from engine.parallel import Parallel, ShardedQwen3ForCausalLM
    from engine.qwen3 import on_meta
    from profiling.measure import model_summary

    files = sorted(baselines.BASELINE_ROOT.glob(f"*/tp*/{baselines.BASELINE_FILE}"))
    if not files:
        pytest.skip("no tensor-parallel baseline committed yet")
    for path in files:
        stored = json.loads(path.read_text())["model"]
        assert path.parent.name == f"tp{stored['tp']}", path
        config = default_config().replace(**stored["config"])
        with registry.rank_fusions_listed():
            with on_meta(getattr(torch, stored["dtype"])):
                model = ShardedQwen3ForCausalLM(config, Parallel(0, stored["tp"]))
            _assert_describes(path, stored, model_summary(model))


def _report_not_yet_baselined(path, stored: dict, now: dict) -> None:
    """A fusion added since the baseline was recorded is not a failure on CPU (the GPU gate
    exits 3 for it until the baseline is recorded again): said as a warning."""
    new = baselines.not_yet_baselined(now, stored)
    if new:
        warnings.warn(f"{path}: not yet baselined: {', '.join(new)}", stacklevel=2)


def _assert_describes(path, stored: dict, now: dict) -> None:
    """The baselined fusions as the code describes them (a fusion the baseline does not know
    yet is reported, and left out of the defaults and alternatives compared)."""
    _report_not_yet_baselined(path, stored, now)
    known = set(stored["fusions"])
    defaults = [f for f in now["default_fusions"] if f in known]
    assert defaults == stored["default_fusions"], (
        f"{path}: default fusions {defaults} in the code, "
        f"{stored['default_fusions']} in the baseline: re-record it or restore the default"
    )
    assert known <= set(now["fusions"]), f"{path}: the baseline gates a fusion gone from the code"
    for name in known:
        info = dict(now["fusions"][name])
        info["alternatives"] = [a for a in info["alternatives"] if a in known]
        assert info == stored["fusions"][name], f"{path}: fusion {name} differs"


# --------------------------------------------------------------------------------------------
# GPU: the gate against this GPU's stored baseline (timing: serial, never in xdist workers)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.timing
def test_unchanged_code_passes_the_gate():
    from profiling.gate import default_model, run_gate

    try:
        stored = load_baseline()
    except BaselineMissing as exc:
        pytest.skip(str(exc))
    result, _ = run_gate(default_model(), stored, seed=0)
    assert result.ok, result.summary()


# --------------------------------------------------------------------------------------------
# Baselines from several processes
# --------------------------------------------------------------------------------------------


def test_combined_runs_take_medians_and_limits_follow_the_spread_across_processes(model):
    from profiling.baselines import combine_runs

    runs = [synthetic_report(seed=40 + i, model=model) for i in range(3)]
    key = "o_proj_residual/m1/unfused"
    for run, shift in zip(runs, (1.0, 1.03, 0.99), strict=True):  # one process 3% off
        run["kernel_ratios"][key]["ratio"] *= shift
    combined = combine_runs(runs)
    ratios = [r["kernel_ratios"][key]["ratio"] for r in runs]
    assert combined["kernel_ratios"][key]["ratio"] == sorted(ratios)[1]
    assert combined["kernel_ratios"][key]["runs"] == ratios
    one = make_baseline(runs[0])["kernel_ratios"][key]["tolerance"]
    three = make_baseline(combined)["kernel_ratios"][key]["tolerance"]
    assert one == baselines.KERNEL_RATIO_FLOOR < three <= baselines.KERNEL_RATIO_CAP
    # Every run is within the combined limits.
    assert all(r <= make_baseline(combined)["kernel_ratios"][key]["max"] for r in ratios)


def test_runs_that_count_other_launches_are_not_combined(model):
    from profiling.baselines import combine_runs

    a = synthetic_report(seed=50, model=model)
    b = synthetic_report(seed=51, model=model, extra_kernels={"o_proj_residual": 1})
    with pytest.raises(BaselineMismatch, match="other launches"):
        combine_runs([a, b])


def test_record_combines_stored_runs_on_any_machine(model, tmp_path):
    from profiling.__main__ import main

    paths = []
    for i in range(3):
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps(synthetic_report(seed=60 + i, model=model)))
        paths.append(str(path))
    root = tmp_path / "baselines"
    assert main(["record", "--combine", *paths, "--root", str(root)]) == 0
    stored = load_baseline(H100[1], root=root)
    assert len(stored["combined_runs"]) == 3
    assert all(len(e["runs"]) == 3 for e in stored["kernel_ratios"].values())
