"""Unexplained wins: a timing figure better than its stored baseline beyond tolerance passes
with the note "faster than baseline: re-record"; ``gate --strict`` fails on it. Synthetic runs
of the gate's stages (tests/gate_helpers.py) against a baseline made from another one."""

from __future__ import annotations

import random

import pytest
from gate_helpers import small_model, synthetic_report

import profiling.__main__ as cli
from profiling import gate
from profiling.baselines import make_baseline
from profiling.gate import WIN_NOTE, Check, GateResult, compare


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def baseline(model):
    return make_baseline(synthetic_report(seed=random.randrange(2**31), model=model))


def _run(model, **kwargs):
    return synthetic_report(seed=random.randrange(2**31), model=model, **kwargs)


def test_unchanged_performance_has_no_wins(model, baseline):
    for _ in range(3):
        result = compare(_run(model), baseline)
        assert result.ok and result.wins == [], result.summary()
        assert WIN_NOTE not in result.summary()
        assert result.strict().ok


@pytest.mark.parametrize("fusion", ["o_proj_residual", "add_rms_norm", "norm_gate_up_silu"])
def test_a_faster_fused_step_is_noted_and_fails_only_under_strict(model, baseline, fusion):
    result = compare(_run(model, ratio_scale={fusion: 0.9}), baseline)
    assert result.ok, result.summary()  # the verdict is unchanged
    assert {w.stage for w in result.wins} == {"kernel_ratio"}
    assert all(w.key.startswith(f"{fusion}/") for w in result.wins)
    assert WIN_NOTE in result.summary()
    strict = result.strict()
    assert not strict.ok
    assert {c.key for c in strict.failures} == {w.key for w in result.wins}
    assert result.to_json()["faster_than_baseline"]


def test_faster_decode_and_a_larger_gain_are_noted(model, baseline):
    result = compare(_run(model, default_tok_s=1300.0, gain={"all": 0.9}), baseline)
    assert result.ok, result.summary()
    keys = {(w.stage, w.key) for w in result.wins}
    for batch in baseline["e2e"]:
        assert ("tok_s", f"{batch}.default") in keys
        assert ("speedup", f"{batch}.speedup.all") in keys


def test_a_win_within_tolerance_is_not_noted(model, baseline):
    tol = min(e["tolerance"] for e in baseline["kernel_ratios"].values())
    result = compare(_run(model, ratio_scale=1 - tol / 3), baseline)
    assert result.ok and not [w for w in result.wins if w.stage == "kernel_ratio"]


def test_a_regression_is_still_a_failure_beside_a_win(model, baseline):
    result = compare(
        _run(model, ratio_scale={"add_rms_norm": 0.9, "o_proj_residual": 1.1}), baseline
    )
    assert not result.ok
    assert {c.key.split("/")[0] for c in result.failures} == {"o_proj_residual"}
    assert {w.key.split("/")[0] for w in result.wins} == {"add_rms_norm"}


def test_gate_strict_exit_code(monkeypatch, capsys):
    win = Check("kernel_ratio", "add_rms_norm/m1/unfused", "0.40 vs baseline 0.50", True, True)

    def fake_run_gate(model, baseline, *, seed=0, log=print):
        return GateResult([Check("launches", "k", "m", True)], [], [win]), {}

    monkeypatch.setattr(cli, "HAS_GPU", True)
    monkeypatch.setattr(cli, "_load_baseline", lambda root: ({"model": {"config": {}}}, None))
    monkeypatch.setattr(gate, "default_model", lambda config=None: None)
    monkeypatch.setattr(gate, "run_gate", fake_run_gate)
    assert cli.main(["gate"]) == 0
    assert WIN_NOTE in capsys.readouterr().out
    assert cli.main(["gate", "--strict"]) == 1
    assert "gate: FAIL" in capsys.readouterr().out
