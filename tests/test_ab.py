"""The A/B against a commit and the bisect over its verdict are themselves tested.

The statistics on paired log ratios drawn fresh: a planted 3% slower kernel ratio and a 2%
lower tok/s come out "slower"; identical distributions never "slower"; the 95% interval
covers the true effect about 95% of the time. The comparison on synthetic runs of the gate's
stages (tests/gate_helpers.py): a planted slower fusion, an extra kernel, a numerics verdict
that flips. The orchestration with a measurement injected (order AB, BA, AB; this tree against
an exported commit), and once for real on CPU: this tree against its own commit (A/A) exits
0. Bisect in a temporary repository whose commits carry a planted change, the measurement
injected, so its logic is tested without timings.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from gate_helpers import small_model, synthetic_report

from profiling import ab
from profiling.ab import ABError, compare_runs, estimate

ROOT = Path(__file__).resolve().parent.parent


def _logs(rng: random.Random, shift: float, sd: float, n: int) -> list[float]:
    """Paired log ratios of figures with per-process noise ``sd`` in each tree."""
    return [math.log1p(shift) + rng.gauss(0, sd) - rng.gauss(0, sd) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "shift"), [("kernel_ratio", 0.03), ("tok_s", -0.02), ("speedup", -0.02)]
)
def test_a_planted_slowdown_comes_out_slower(kind, shift, seeded_rng):
    """200 simulated A/Bs of 5 pairs at 0.4% noise a process. A 2% tok/s or speed-up change
    misses "slower" in about 1 A/B of 4,000 at this noise (simulated: 2.5e-4 and 1.5e-4 a
    trial; 0 for a 3% kernel ratio), so one miss in 200 happens in ~5% of runs: at most one
    is allowed (two or more: ~0.1% of runs). The draws follow the run's printed seed."""
    rng = random.Random(seeded_rng)
    effects, missed = [], []
    for _ in range(200):
        e = estimate("f", kind, _logs(rng, shift, 0.004, 5))
        if e.verdict != "slower":
            missed.append(e)
        effects.append(e.effect)
    assert len(missed) <= 1, missed
    assert sum(effects) / len(effects) == pytest.approx(shift, abs=0.001)


@pytest.mark.parametrize("kind", ["kernel_ratio", "tok_s"])
def test_a_planted_speedup_comes_out_faster(kind):
    rng = random.Random()
    shift = -0.03 if kind == "kernel_ratio" else 0.03
    verdicts = {estimate("f", kind, _logs(rng, shift, 0.004, 5)).verdict for _ in range(100)}
    assert verdicts == {"faster"}


@pytest.mark.parametrize("kind", ["kernel_ratio", "tok_s", "speedup"])
def test_identical_distributions_are_never_slower(kind):
    rng = random.Random()
    # Noise well below the floor: every A/A is "same".
    tight = [estimate("f", kind, _logs(rng, 0.0, 0.0005, 5)).verdict for _ in range(300)]
    assert set(tight) == {"same"}
    # Noise near the floor: a false "slower" needs the interval above zero (a 2.5% tail at
    # most) and the mean beyond the floor: rarer than 2.5% of A/As.
    loose = [estimate("f", kind, _logs(rng, 0.0, 0.004, 3)).verdict for _ in range(4000)]
    assert loose.count("slower") / len(loose) <= 0.025, loose.count("slower")
    assert loose.count("faster") / len(loose) <= 0.025, loose.count("faster")


def test_one_pair_has_no_interval_and_is_inconclusive():
    e = estimate("f", "kernel_ratio", [math.log(1.2)])
    assert (e.verdict, e.low, e.high) == ("inconclusive", None, None)
    assert e.effect == pytest.approx(0.2)


def test_an_effect_within_the_floor_is_not_slower_even_when_certain():
    rng = random.Random()
    shift = ab.FLOORS["kernel_ratio"] / 2
    for _ in range(50):
        e = estimate("f", "kernel_ratio", _logs(rng, shift, 0.0002, 6))
        assert e.low > 0  # the interval excludes zero
        assert e.verdict == "same", e


def test_the_interval_covers_the_true_effect_95_percent_of_the_time():
    rng = random.Random()
    for n in (2, 3, 5, 40):
        shift = rng.uniform(-0.05, 0.05)
        hits = 0
        for _ in range(3000):
            e = estimate("f", "tok_s", _logs(rng, shift, 0.01, n))
            hits += e.low <= shift <= e.high
        assert 0.93 <= hits / 3000 <= 0.97, (n, hits / 3000)


def test_t_quantiles_fall_towards_the_normal():
    qs = [ab.t_quantile(df) for df in range(1, 200)]
    assert all(a > b for a, b in itertools.pairwise(qs))
    # Published t_0.975 values, on both sides of the table's end.
    for df, t in ((1, 12.706), (5, 2.571), (30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980)):
        assert ab.t_quantile(df) == pytest.approx(t, abs=6e-4)
    assert ab.t_quantile(10**6) == pytest.approx(1.96, abs=1e-3)


# --------------------------------------------------------------------------------------------
# Comparing runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return small_model()


def _pairs(model, n, **new_kwargs):
    return [
        (
            synthetic_report(seed=random.randrange(2**31), model=model),
            synthetic_report(seed=random.randrange(2**31), model=model, **new_kwargs),
        )
        for _ in range(n)
    ]


def test_same_runs_pass_with_every_timed_figure_compared(model):
    result = compare_runs(_pairs(model, 3))
    assert result.ok, result.table()
    kinds = {e.kind for e in result.estimates}
    assert kinds == {"kernel_ratio", "tok_s", "speedup"}
    assert not result.slower and not result.changed
    run = synthetic_report(seed=1, model=model)
    assert len(result.estimates) == len(ab.timed_figures(run))


def test_a_planted_slower_fusion_is_named_and_fails(model):
    fusion = random.choice(list(synthetic_report(seed=0, model=model)["model"]["fusions"]))
    result = compare_runs(_pairs(model, 3, ratio_scale={fusion: 1.03}))
    assert not result.ok
    slower = {e.name for e in result.slower}
    assert slower and all(n.startswith(f"kernel_ratio:{fusion}/") for n in slower), slower
    for e in result.slower:
        assert e.low < 0.03 < e.high or abs(e.effect - 0.03) < 0.005


def test_an_extra_kernel_is_an_exact_change(model):
    result = compare_runs(_pairs(model, 2, extra_kernels={"o_proj": 1}))
    assert not result.ok
    names = [c["name"] for c in result.changed]
    assert any(n.endswith(".o_proj") for n in names), names
    assert any(n.endswith(".kernels_per_step") for n in names), names


def test_a_numerics_verdict_that_flips_is_an_exact_change(model):
    pairs = _pairs(model, 2)
    for base, new in pairs:
        row = {"name": "add_rms_norm", "dtype": "bfloat16", "rows": 8, "max_abs": 0.01}
        base["numerics"] = [{**row, "ok": True}]
        new["numerics"] = [{**row, "ok": False}]
    result = compare_runs(pairs)
    assert [c["name"] for c in result.changed] == ["numerics:add_rms_norm/bfloat16/m8"]
    assert not result.ok


def test_the_table_and_chart_show_every_figure(model, tmp_path):
    fusion = "add_rms_norm"
    result = compare_runs(_pairs(model, 3, ratio_scale={fusion: 1.03}))
    text = result.table()
    for e in result.estimates:
        assert e.name in text
    assert "ab: FAIL" in text
    path = ab.plot(result, tmp_path / "ab.png")
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# Orchestration (measurement injected)
# --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
    }
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    out = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _fake_run(scale: float, kernels: int, rng: random.Random) -> dict:
    """The figures a run reports, made from a tree's planted scale and kernel count."""
    noise = lambda: math.exp(rng.gauss(0, 0.003))
    return {
        "model": {"default_fusions": ["add_rms_norm"]},
        "kernel_ratios": {"add_rms_norm/m1/unfused": {"ratio": 0.6 * scale * noise()}},
        "e2e": {
            "b1": {
                "variants": {"default": {"median": 900 / scale * noise()}},
                "speedups": {"all": {"median": 1.3 * noise()}},
            }
        },
        "launches": {
            "default/graph-b1": {
                "kernels_per_step": kernels,
                "memcpy_per_step": 1,
                "memset_per_step": 0,
                "segments": {},
            }
        },
        "numerics": [],
    }


def _fake_measure(calls: list | None = None):
    rng = random.Random()

    def measure(tree: Path, label: str, out_dir: Path) -> dict:
        if (tree / "broken").exists():
            raise ABError(f"{label}: measure exited 1: broken")
        if calls is not None:
            calls.append(label)
        scale = float((tree / "scale").read_text())
        return _fake_run(scale, int((tree / "kernels").read_text()), rng)

    return measure


def _repo(tmp_path: Path, commits: list[tuple[float, int, bool]]) -> tuple[Path, list[str]]:
    """A repository whose commits carry a scale, a kernel count and maybe a broken build."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    shas = []
    for i, (scale, kernels, broken) in enumerate(commits):
        (repo / "scale").write_text(f"{scale}\n")
        (repo / "kernels").write_text(f"{kernels}\n")
        if broken:
            (repo / "broken").write_text("x\n")
        elif (repo / "broken").exists():
            (repo / "broken").unlink()
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "--allow-empty", "-m", f"commit {i}")
        shas.append(_git(repo, "rev-parse", "HEAD"))
    return repo, shas


def test_pairs_alternate_ab_ba(tmp_path):
    repo, _ = _repo(tmp_path, [(1.0, 30, False)])
    calls: list[str] = []
    ab.run_pairs(repo, "A", repo, "B", 4, _fake_measure(calls), log=lambda line: None)
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]


def test_ab_against_an_exported_commit(tmp_path):
    repo, shas = _repo(tmp_path, [(1.0, 30, False), (1.0, 30, False)])
    quiet = {"log": lambda line: None}
    same = ab.ab(repo, shas[0], repo, 4, _fake_measure(), **quiet)
    assert same.ok and same.base == shas[0], same.table()
    (repo / "scale").write_text("1.03\n")  # this tree, uncommitted: 3% slower
    slower = ab.ab(repo, "HEAD~1", repo, 4, _fake_measure(), **quiet)
    assert not slower.ok
    assert {e.name for e in slower.slower} == {
        "kernel_ratio:add_rms_norm/m1/unfused",
        "tok_s:b1.default",
    }
    (repo / "scale").write_text("1.0\n")
    (repo / "kernels").write_text("31\n")
    changed = ab.ab(repo, "HEAD", repo, 2, _fake_measure(), **quiet)
    assert [c["name"] for c in changed.changed] == ["launches:default/graph-b1.kernels_per_step"]
    with pytest.raises(ValueError, match="--base 'nope'"):
        ab.ab(repo, "nope", repo, 1, _fake_measure(), **quiet)


def test_a_tree_that_fails_to_measure_names_its_side(tmp_path):
    repo, shas = _repo(tmp_path, [(1.0, 30, True), (1.0, 30, False)])
    with pytest.raises(ABError) as info:
        ab.ab(repo, shas[0], repo, 1, _fake_measure(), log=lambda line: None)
    assert info.value.side == "base"


# --------------------------------------------------------------------------------------------
# Bisect (measurement injected)
# --------------------------------------------------------------------------------------------


def _ab_of(pairs: int = 4):
    measure = _fake_measure()

    def ab_of(good_tree, good_commit, tree, commit, figure):
        runs = ab.run_pairs(good_tree, good_commit, tree, commit, pairs, measure, lambda s: None)
        return compare_runs(runs, good_commit, commit)

    return ab_of


def _bisect_state(repo: Path) -> tuple[str, str, bool]:
    head = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain")
    under_way = (repo / _git(repo, "rev-parse", "--git-path", "BISECT_LOG")).exists()
    return head, status, under_way


@pytest.mark.parametrize("broken", [False, True])
def test_bisect_finds_the_planted_slowdown(tmp_path, broken):
    first_bad = random.randrange(2, 8)
    commits = [(1.0 if i < first_bad else 1.03, 30, False) for i in range(10)]
    if broken:  # a commit before the planted one that does not build: skipped
        commits[first_bad - 1] = (1.0, 30, True)
    repo, shas = _repo(tmp_path, commits)
    before = _bisect_state(repo)
    result = ab.bisect(repo, shas[0], shas[-1], _ab_of(), log=lambda line: None)
    assert _bisect_state(repo) == before  # reset, nothing checked out
    if broken and result.first_bad is None:
        # The skipped commit sits right before the planted one: git names both candidates.
        assert shas[first_bad] in result.message and shas[first_bad - 1] in result.message
        assert any(s["verdict"] == "skip" for s in result.steps)
        return
    assert result.first_bad == shas[first_bad], (first_bad, result.steps)
    assert result.subject == f"commit {first_bad}"
    assert result.figure in ("kernel_ratio:add_rms_norm/m1/unfused", "tok_s:b1.default")
    assert result.effect.verdict == "slower"
    assert abs(result.effect.effect) == pytest.approx(0.03, abs=0.01)
    assert "first bad commit" in ab.bisect_text(result)


def test_bisect_measures_candidates_on_the_figure_it_follows(tmp_path):
    """BAD's A/B measures everything (no figure chosen yet); every candidate's, only the
    figure bisect follows (scope_args: its stage)."""
    first_bad = random.randrange(2, 6)
    repo, shas = _repo(tmp_path, [(1.0 if i < first_bad else 1.03, 30, False) for i in range(7)])
    inner, asked = _ab_of(), []

    def recording(good_tree, good_commit, tree, commit, figure):
        asked.append(figure)
        return inner(good_tree, good_commit, tree, commit, figure)

    result = ab.bisect(repo, shas[0], shas[-1], recording, log=lambda line: None)
    assert result.first_bad == shas[first_bad]
    assert asked[0] is None and len(asked) > 1
    assert set(asked[1:]) == {result.figure}
    given = []
    ab.bisect(
        repo, shas[0], shas[-1], lambda *a: given.append(a[-1]) or inner(*a),
        figure="tok_s:b1.default", log=lambda line: None,
    )  # fmt: skip
    assert set(given) == {"tok_s:b1.default"}


@pytest.mark.parametrize(
    ("figure", "args"),
    [
        ("kernel_ratio:attention/m1/copy", ["--stages", "kernel_ratios"]),
        ("kernel_ratio:o_proj_residual/m8/addmm_", ["--stages", "kernel_ratios"]),
        ("tok_s:b8.default", ["--stages", "e2e", "--batches", "8"]),
        ("speedup:b1.all", ["--stages", "e2e", "--batches", "1"]),
        ("launches:default/graph-b1.kernels_per_step", ["--stages", "launches"]),
        ("numerics:o_proj_residual.residual/bfloat16/m1", ["--stages", "numerics"]),
        ("flags:default_fusions", ["--stages", "launches"]),
    ],
)
def test_a_figure_is_measured_by_its_own_stage(figure, args):
    assert ab.scope_args(figure) == args
    # every figure the A/B names is of a kind scope_args knows
    names = {
        *ab.timed_figures(synthetic_report(seed=1)),
        *ab.exact_figures(synthetic_report(seed=1)),
    }
    assert {n.partition(":")[0] for n in names} <= set(ab.STAGE_OF)


def test_an_unknown_figure_kind_is_refused_naming_it():
    with pytest.raises(ValueError, match="'watts:b1'"):
        ab.scope_args("watts:b1")


def test_a_tree_older_than_stages_is_measured_whole(tmp_path):
    assert ab.measures_stages(ROOT)
    (tmp_path / "profiling").mkdir()
    (tmp_path / "profiling" / "__main__.py").write_text('p.add_argument("--figure")\n')
    assert not ab.measures_stages(tmp_path)
    assert not ab.measures_stages(tmp_path / "missing")


def test_bisect_on_an_exact_figure(tmp_path):
    first_bad = random.randrange(1, 6)
    repo, shas = _repo(tmp_path, [(1.0, 30 + (i >= first_bad), False) for i in range(6)])
    result = ab.bisect(
        repo, shas[0], shas[-1], _ab_of(2),
        figure="launches:default/graph-b1.kernels_per_step", log=lambda line: None,
    )  # fmt: skip
    assert result.first_bad == shas[first_bad]
    assert result.effect["new"] == 31


def test_bisect_with_nothing_slower_bisects_nothing(tmp_path):
    repo, shas = _repo(tmp_path, [(1.0, 30, False)] * 4)
    result = ab.bisect(repo, shas[0], shas[-1], _ab_of(), log=lambda line: None)
    assert result.first_bad is None and "nothing to bisect" in result.message


def test_bisect_always_resets_even_when_measuring_fails(tmp_path):
    repo, shas = _repo(tmp_path, [(1.0 if i < 3 else 1.03, 30, False) for i in range(8)])
    good_ab = _ab_of()
    seen = []

    def failing(good_tree, good_commit, tree, commit, figure):
        seen.append(commit)
        if len(seen) > 1:  # BAD measured; the first candidate raises
            raise RuntimeError("boom")
        return good_ab(good_tree, good_commit, tree, commit, figure)

    before = _bisect_state(repo)
    with pytest.raises(RuntimeError, match="boom"):
        ab.bisect(repo, shas[0], shas[-1], failing, log=lambda line: None)
    assert _bisect_state(repo) == before


@pytest.mark.parametrize(
    ("good", "bad", "match"),
    [("nope", -1, "GOOD 'nope'"), (-1, 0, "not an ancestor"), (0, 0, "same commit")],
)
def test_bisect_refuses_bad_refs(tmp_path, good, bad, match):
    repo, shas = _repo(tmp_path, [(1.0, 30, False)] * 3)
    good = shas[good] if isinstance(good, int) else good
    with pytest.raises(ValueError, match=match):
        ab.bisect(repo, good, shas[bad], _ab_of(), log=lambda line: None)


def test_bisect_refuses_an_unknown_figure(tmp_path):
    repo, shas = _repo(tmp_path, [(1.0, 30, False), (1.03, 30, False)])
    with pytest.raises(ValueError, match="--figure 'tok_s:b9'"):
        ab.bisect(repo, shas[0], shas[1], _ab_of(), figure="tok_s:b9", log=lambda s: None)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "profiling", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["ab"], "--base REF"),
        (["ab", "--base", "no-such-ref-x"], "--base 'no-such-ref-x'"),
        (["gate", "--base", "no-such-ref-x"], "--base 'no-such-ref-x'"),
        (["bisect", "HEAD"], "GOOD and BAD"),
        (["report", "--pairs", "2"], "--pairs"),
        (["measure", "--strict"], "--strict"),
        (["report", "--stages", "numerics"], "--stages"),
        (["measure", "--stages", "watts"], "--stages"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, named):
    result = _cli(*args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert named in last and "Traceback" not in result.stderr


def test_ab_of_this_tree_against_its_own_commit_on_cpu(tmp_path):
    """A/A for real: HEAD exported, both trees measured in fresh processes (CPU: numerics and
    the exact figures; the timed stages need a GPU)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU A/A (on a GPU the A/A measures every timed stage)")
    result = _cli("ab", "--base", "HEAD", "--pairs", "1", "--out", str(tmp_path), "--seed", "7")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ab: PASS" in result.stdout and "slower" not in result.stdout.replace("slower 0", "")
    import json

    data = json.loads((tmp_path / "ab.json").read_text())
    assert data["ok"] and data["changed"] == [] and data["pairs"] == 1
    assert (tmp_path / "ab.png").stat().st_size > 1000


def test_the_power_simulation_judges_with_the_ab_verdict():
    """scripts.ab_power: quiet figures come out "same" unchanged and "slower" planted; figures
    whose noise dwarfs the floor are never "same"; the noise read from every committed
    baseline is positive for every kind."""
    from scripts import ab_power

    rng = random.Random()
    quiet = ab_power.rates("tok_s", 0.001, 5, 300, rng)
    assert quiet["same"] > 0.95 and quiet["planted_slower"] > 0.95 and quiet["false_slower"] == 0
    noisy = ab_power.rates("kernel_ratio", 0.05, 5, 300, rng)
    assert noisy["same"] < 0.05 and noisy["planted_slower"] < 0.5
    paths = sorted((ROOT / "perf_baselines").glob("*/baseline.json"))
    sds = ab_power.noise(paths)
    assert set(sds) == set(ab.FLOORS) and all(s and min(s) > 0 for s in sds.values())
