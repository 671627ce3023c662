"""A/B against a commit: is this tree slower than REF, here, now?

``python -m profiling ab --base REF`` exports REF's tree (``git archive``) and runs
``python -m profiling measure`` in each tree in alternating fresh processes, pairs ordered
AB, BA, AB, ... (drift over time falls on both trees alike). Each pair gives, per timed
figure present in both runs (every kernel ratio, every variant's tok/s, every speed-up), one
paired log ratio log(this / REF); ``estimate`` turns a figure's log ratios into an effect,
a 95% Student-t interval and a verdict against a practical floor (``FLOORS``). Exact figures
(the default fusions, launch counts, numerics verdicts) must be equal in every pair.

``python -m profiling bisect GOOD BAD`` runs git bisect (no checkout: each candidate is
exported) over the A/B verdict of one figure against GOOD's tree.

The statistics (``estimate``, ``compare_runs``) are pure functions of runs; the measurement
is a parameter of ``run_pairs`` and ``bisect`` (CPU tests pass synthetic runs).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LEVEL = 0.95
# Practical floors: smaller effects are "same" even when the interval excludes zero. Relative
# changes of the figure, set from its process-to-process noise in the committed baselines
# (three processes each, H100 and H200; sd of the log): tok/s 0.15% pooled (0.34% the
# worst), speed-ups 0.22% (0.42%), kernel ratios 0.67% (1.7%) with the median of 11 rounds,
# which 33 rounds narrow by about sqrt(3) (docs/definitions.md, "Kernel timing").
FLOORS = {"kernel_ratio": 0.015, "tok_s": 0.01, "speedup": 0.01}
# Pairs on a GPU unless --pairs says otherwise: with the noise above, 5 pairs call a 2-3%
# slowdown "slower" and an unchanged figure "same" nearly always (simulated: scripts/ab_power.py).
DEFAULT_PAIRS = 5
# Lower is better for a kernel ratio (fused / reference); higher for tok/s and speed-ups.
LOWER_IS_BETTER = {"kernel_ratio": True, "tok_s": False, "speedup": False}
VERDICTS = ("slower", "faster", "same", "inconclusive")

# Two-sided 95% Student-t quantiles (t_0.975) for 1..30 degrees of freedom.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


class ABError(RuntimeError):
    """A tree could not be exported or measured (``side``: "base" or "new", or "git")."""

    def __init__(self, message: str, side: str = "base"):
        super().__init__(message)
        self.side = side


def t_quantile(df: int) -> float:
    """t_0.975 with ``df`` degrees of freedom (beyond the table: Cornish-Fisher, < 1e-4 off)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


# --------------------------------------------------------------------------------------------
# Figures of a run
# --------------------------------------------------------------------------------------------


def timed_figures(run: dict) -> dict[str, tuple[str, float]]:
    """Every timed figure of a run of the gate's stages: name -> (kind, value)."""
    out = {}
    for key, r in sorted(run.get("kernel_ratios", {}).items()):
        out[f"kernel_ratio:{key}"] = ("kernel_ratio", r["ratio"])
    for bkey, e in sorted(run.get("e2e", {}).items()):
        for variant, v in sorted(e["variants"].items()):
            out[f"tok_s:{bkey}.{variant}"] = ("tok_s", v["median"])
        for name, s in sorted(e["speedups"].items()):
            out[f"speedup:{bkey}.{name}"] = ("speedup", s["median"])
    return out


def exact_figures(run: dict) -> dict[str, object]:
    """Every figure that must not change at all: default fusions, launch counts per key,
    field and segment, and each numerics check's verdict."""
    out: dict[str, object] = {"flags:default_fusions": list(run["model"]["default_fusions"])}
    for key, e in sorted(run.get("launches", {}).items()):
        for field in ("kernels_per_step", "memcpy_per_step", "memset_per_step"):
            out[f"launches:{key}.{field}"] = e[field]
        for name, s in sorted(e["segments"].items()):
            out[f"launches:{key}.{name}"] = [s["instances"], s["per_instance"]]
    for r in run.get("numerics", []):
        verdict = "skipped" if "skipped" in r else ("pass" if r["ok"] else "fail")
        out[f"numerics:{r['name']}/{r['dtype']}/m{r['rows']}"] = verdict
    return out


# The gate's stage that measures a figure, by the figure's kind (its name before the colon).
STAGE_OF = {
    "kernel_ratio": "kernel_ratios",
    "tok_s": "e2e",
    "speedup": "e2e",
    "launches": "launches",
    "numerics": "numerics",
    "flags": "launches",  # the default fusions are in every run's header
}


def scope_args(figure: str) -> list[str]:
    """``measure`` options that measure ``figure`` and little else: its stage, and a decode
    figure's batch alone (``tok_s:b8.default`` -> ``--stages e2e --batches 8``)."""
    kind, _, rest = figure.partition(":")
    if kind not in STAGE_OF:
        raise ValueError(f"{figure!r}: not a figure name (kinds: {', '.join(STAGE_OF)})")
    args = ["--stages", STAGE_OF[kind]]
    if STAGE_OF[kind] == "e2e":
        args += ["--batches", rest.split(".")[0].removeprefix("b")]
    return args


def measures_stages(tree: Path) -> bool:
    """Whether ``tree``'s ``measure`` takes ``--stages`` (trees older than it measure all)."""
    cli = tree / "profiling" / "__main__.py"
    return cli.exists() and '"--stages"' in cli.read_text()


# --------------------------------------------------------------------------------------------
# The statistics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One timed figure over the pairs: effect = this / REF - 1 (geometric mean of the pairs),
    its 95% interval (None with one pair) and the verdict."""

    name: str
    kind: str
    pairs: int
    effect: float
    low: float | None
    high: float | None
    floor: float
    verdict: str

    def slowdown(self) -> float:
        """The effect signed so that positive is slower (a kernel ratio up, tok/s down)."""
        return self.effect if LOWER_IS_BETTER[self.kind] else -self.effect

    def interval_text(self) -> str:
        if self.low is None:
            return "(one pair: none)"
        return f"[{self.low:+.2%}, {self.high:+.2%}]"


def estimate(name: str, kind: str, logs: list[float], floor: float | None = None) -> Estimate:
    """The verdict on paired log ratios log(this / REF) of one figure.

    slower / faster: the 95% t interval excludes zero and the mean effect exceeds the floor
    (in the worse / better direction); same: the whole interval lies within +-floor;
    otherwise inconclusive (also with a single pair: no interval)."""
    floor = FLOORS[kind] if floor is None else floor
    n = len(logs)
    if n == 0:
        raise ValueError(f"{name}: no pairs")
    mean = statistics.fmean(logs)
    low = high = None
    verdict = "inconclusive"
    if n >= 2:
        half = t_quantile(n - 1) * statistics.stdev(logs) / math.sqrt(n)
        lo, hi = mean - half, mean + half
        low, high = math.expm1(lo), math.expm1(hi)
        # In "worse" units: positive is slower.
        sign = 1.0 if LOWER_IS_BETTER[kind] else -1.0
        w_lo, w_hi = sorted((sign * lo, sign * hi))
        w_mean, f = sign * mean, math.log1p(floor)
        if w_lo > 0 and w_mean > f:
            verdict = "slower"
        elif w_hi < 0 and -w_mean > f:
            verdict = "faster"
        elif -f <= w_lo and w_hi <= f:
            verdict = "same"
    return Estimate(name, kind, n, math.expm1(mean), low, high, floor, verdict)


@dataclasses.dataclass
class ABResult:
    base: str  # REF's commit
    new: str  # this tree's commit (or its folder)
    pairs: int
    estimates: list[Estimate]
    changed: list[dict]  # exact figures that differ: name, base, new
    notes: list[str]

    @property
    def slower(self) -> list[Estimate]:
        return [e for e in self.estimates if e.verdict == "slower"]

    @property
    def ok(self) -> bool:
        return not self.slower and not self.changed

    def find(self, name: str) -> Estimate | dict | None:
        for e in self.estimates:
            if e.name == name:
                return e
        for c in self.changed:
            if c["name"] == name:
                return c
        return None

    def table(self) -> str:
        width = max([len(e.name) for e in self.estimates] + [len("figure")])
        lines = [
            f"A/B: this tree ({self.new}) against {self.base}, {self.pairs} pair(s) of fresh "
            "processes",
            f"  {'figure':<{width}}  {'effect':>8}  {'95% interval':<20}  verdict",
        ]
        for e in self.estimates:
            lines.append(
                f"  {e.name:<{width}}  {e.effect:>+8.2%}  {e.interval_text():<20}  {e.verdict}"
                + (" (floor " + f"{e.floor:.1%})" if e.verdict != "same" else "")
            )
        if not self.estimates:
            lines.append("  (no timed figure in both runs: launch counts, kernel timing and decode")
            lines.append("   need a CUDA GPU)")
        for c in self.changed:
            lines.append(f"  CHANGED {c['name']}: {c['base']} -> {c['new']}")
        lines += [f"  note: {n}" for n in self.notes]
        counts = {v: sum(e.verdict == v for e in self.estimates) for v in VERDICTS}
        lines.append(
            f"ab: {'PASS' if self.ok else 'FAIL'} ("
            + ", ".join(f"{v} {n}" for v, n in counts.items())
            + f"; exact figures changed {len(self.changed)})"
        )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "base": self.base,
            "new": self.new,
            "pairs": self.pairs,
            "level": LEVEL,
            "floors": FLOORS,
            "estimates": [dataclasses.asdict(e) for e in self.estimates],
            "changed": self.changed,
            "notes": self.notes,
        }


def compare_runs(pairs: list[tuple[dict, dict]], base: str = "base", new: str = "new") -> ABResult:
    """``pairs``: (REF's run, this tree's run) per pair of processes."""
    if not pairs:
        raise ValueError("no pairs to compare")
    estimates = []
    figures = [(timed_figures(b), timed_figures(n)) for b, n in pairs]
    common = set.intersection(*(set(b) & set(n) for b, n in figures))
    notes = []
    for name in sorted(common):
        kind = figures[0][0][name][0]
        logs = [math.log(n[name][1] / b[name][1]) for b, n in figures]
        estimates.append(estimate(name, kind, logs))
    only = sorted(set().union(*(set(b) ^ set(n) for b, n in figures)))
    if only:
        notes.append(f"timed in one tree only (not compared): {', '.join(only)}")
    changed, seen = [], set()
    for b_run, n_run in pairs:
        b, n = exact_figures(b_run), exact_figures(n_run)
        for name in sorted(set(b) | set(n)):
            if b.get(name) != n.get(name) and name not in seen:
                seen.add(name)
                changed.append({"name": name, "base": b.get(name), "new": n.get(name)})
    failing = sorted(
        k
        for k, v in exact_figures(pairs[0][1]).items()
        if v == "fail" and k not in seen and k.startswith("numerics:")
    )
    if failing:
        notes.append(f"numerics fail in both trees: {', '.join(failing)}")
    return ABResult(base, new, len(pairs), estimates, changed, notes)


# --------------------------------------------------------------------------------------------
# Trees and processes
# --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def git_toplevel(path: Path) -> Path | None:
    try:
        out = _git(path, "rev-parse", "--show-toplevel")
    except OSError:  # no git at all
        return None
    return Path(out.stdout.strip()) if out.returncode == 0 else None


def resolve_commit(repo: Path, ref: str, option: str) -> str:
    """``ref``'s commit id; ValueError (one line naming ``option``) when it is none."""
    out = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if out.returncode != 0 or not out.stdout.strip():
        raise ValueError(f"{option} {ref!r}: not a commit of the repository at {repo}")
    return out.stdout.strip()


def export_tree(repo: Path, commit: str, dest: Path) -> Path:
    """``commit``'s tree, as ``git archive`` gives it, into ``dest``."""
    out = subprocess.run(["git", "archive", "--format=tar", commit], cwd=repo, capture_output=True)
    if out.returncode != 0:
        raise ABError(f"git archive {commit}: {out.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        # The "data" filter where this Python has it (3.12, and backported to 3.10.12+).
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, **kwargs)
    return dest


# measure(tree, label, out_dir) -> the run (run.json's content)
Measure = Callable[[Path, str, Path], dict]


def measure_in_process(extra_args: list[str], seed: int) -> Measure:
    """``python -m profiling measure`` in a fresh process of ``tree`` (its own kernels,
    engine and tables first on the path), every process with the same numerics seed."""

    def run(tree: Path, label: str, out_dir: Path) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
        env["FUSIONGUARD_COMMIT"] = label  # an exported tree has no .git to name it
        cmd = [sys.executable, "-m", "profiling", "measure", "--out", str(out_dir)]
        cmd += ["--seed", str(seed), *extra_args]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
            raise ABError(f"{label}: measure exited {proc.returncode}: {tail[0]}")
        return json.loads((out_dir / "run.json").read_text())

    return run


def run_pairs(
    base_tree: Path,
    base_label: str,
    new_tree: Path,
    new_label: str,
    pairs: int,
    measure: Measure,
    log=print,
) -> list[tuple[dict, dict]]:
    """``pairs`` pairs of runs, order AB, BA, AB, ...: [(REF's run, this tree's run)]."""
    out = []
    with tempfile.TemporaryDirectory(prefix="fusionguard-ab-") as tmp:
        for i in range(pairs):
            runs = {}
            order = ("base", "new") if i % 2 == 0 else ("new", "base")
            for side in order:
                tree, label = (base_tree, base_label) if side == "base" else (new_tree, new_label)
                started = time.perf_counter()
                try:
                    runs[side] = measure(tree, label, Path(tmp) / f"{i}-{side}")
                except ABError as exc:
                    raise ABError(str(exc), side) from exc
                took = time.perf_counter() - started
                log(f"  pair {i + 1} of {pairs}: {side} ({label}) {took:.0f} s")
            out.append((runs["base"], runs["new"]))
    return out


def ab(repo: Path, ref: str, new_tree: Path, pairs: int, measure: Measure, log=print) -> ABResult:
    """Export ``ref`` and A/B ``new_tree`` against it."""
    commit = resolve_commit(repo, ref, "--base")
    new_label = _tree_label(new_tree)
    with tempfile.TemporaryDirectory(prefix="fusionguard-base-") as tmp:
        base_tree = export_tree(repo, commit, Path(tmp) / "tree")
        log(f"exported {ref} ({commit[:12]}) to {base_tree}")
        runs = run_pairs(base_tree, commit, new_tree, new_label, pairs, measure, log)
    return compare_runs(runs, commit, new_label)


def _tree_label(tree: Path) -> str:
    head = _git(tree, "rev-parse", "HEAD")
    if head.returncode != 0:
        return str(tree)
    dirty = _git(tree, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


# --------------------------------------------------------------------------------------------
# The chart
# --------------------------------------------------------------------------------------------


def plot(result: ABResult, path: Path) -> Path:
    """Effect and 95% interval per timed figure, the floors shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    est = result.estimates
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * max(1, len(est))))
    colors = {"slower": "tab:red", "faster": "tab:green", "same": "tab:gray"}
    for i, e in enumerate(est):
        color = colors.get(e.verdict, "tab:orange")
        x = 100 * e.slowdown()
        if e.low is not None:
            lo, hi = sorted(100 * (v if LOWER_IS_BETTER[e.kind] else -v) for v in (e.low, e.high))
            ax.plot([lo, hi], [i, i], color=color, linewidth=2)
        ax.plot([x], [i], "o", color=color)
        ax.fill_betweenx([i - 0.4, i + 0.4], -100 * e.floor, 100 * e.floor, color="0.9")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(est)), [f"{e.name} ({e.verdict})" for e in est], fontsize=7)
    ax.set_xlabel("slowdown, % (positive: this tree slower than base; shaded: floor)")
    ax.set_title(f"A/B against {result.base[:12]}, {result.pairs} pair(s), 95% intervals")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Bisect
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BisectResult:
    figure: str | None
    first_bad: str | None
    subject: str
    effect: Estimate | dict | None  # the first bad commit's A/B against GOOD on the figure
    steps: list[dict]  # per candidate: commit, verdict (good, bad, skip), why
    message: str

    def to_json(self) -> dict:
        effect = self.effect
        if isinstance(effect, Estimate):
            effect = dataclasses.asdict(effect)
        return {**dataclasses.asdict(self), "effect": effect}


# ab_of(good_tree, good_commit, candidate_tree, candidate_commit, figure) -> the candidate's
# A/B; ``figure``: the one bisect follows (None while it is not chosen yet): measuring only its
# stage (scope_args) is enough.
ABOf = Callable[[Path, str, Path, str, "str | None"], ABResult]


def judge(result: ABResult, figure: str, bad: Estimate | dict) -> tuple[str, str]:
    """good / bad / skip for a candidate's A/B against GOOD on ``figure``. Slower is bad, same
    or faster good; an inconclusive one is bad when its slowdown is at least half BAD's."""
    found = result.find(figure)
    if isinstance(bad, dict):  # an exact figure: bad when it changed from GOOD's
        return ("bad", "changed") if isinstance(found, dict) else ("good", "unchanged")
    if found is None:
        return "skip", f"{figure} not measured"
    assert isinstance(found, Estimate)
    if found.verdict == "slower":
        return "bad", f"slower {found.effect:+.2%}"
    if found.verdict in ("same", "faster"):
        return "good", f"{found.verdict} {found.effect:+.2%}"
    half = found.slowdown() >= bad.slowdown() / 2
    return ("bad" if half else "good"), f"inconclusive {found.effect:+.2%}, BAD {bad.effect:+.2%}"


def bisect(
    repo: Path, good: str, bad: str, ab_of: ABOf, *, figure: str | None = None, log=print
) -> BisectResult:
    """The first commit between ``good`` and ``bad`` where ``figure`` is slower than in GOOD
    (an exact figure: changed), by git bisect without a checkout (the working tree is left as
    it is; each candidate is exported). Always ends with ``git bisect reset``."""
    good_c = resolve_commit(repo, good, "GOOD")
    bad_c = resolve_commit(repo, bad, "BAD")
    if good_c == bad_c:
        raise ValueError(f"GOOD {good!r} and BAD {bad!r} are the same commit")
    if _git(repo, "merge-base", "--is-ancestor", good_c, bad_c).returncode != 0:
        raise ValueError(f"GOOD {good!r} is not an ancestor of BAD {bad!r}")
    log_path = repo / _git(repo, "rev-parse", "--git-path", "BISECT_LOG").stdout.strip()
    if log_path.exists():  # (repo / an absolute path is that path)
        raise ValueError(f"a git bisect is already under way in {repo} (git bisect reset ends it)")
    with tempfile.TemporaryDirectory(prefix="fusionguard-bisect-") as tmp:
        good_tree = export_tree(repo, good_c, Path(tmp) / "good")

        def ab_at(commit: str, figure: str | None) -> ABResult:
            with tempfile.TemporaryDirectory(dir=tmp) as cand:
                tree = export_tree(repo, commit, Path(cand) / "tree")
                return ab_of(good_tree, good_c, tree, commit, figure)

        log(f"A/B of BAD {bad_c[:12]} against GOOD {good_c[:12]}")
        at_bad = ab_at(bad_c, figure)
        if figure is None:
            first = at_bad.slower[:1] or at_bad.changed[:1]
            if not first:
                return BisectResult(
                    None,
                    None,
                    "",
                    None,
                    [],
                    "BAD is not slower than GOOD on any figure, "
                    "and no exact figure changed: nothing to bisect",
                )
            figure = first[0].name if isinstance(first[0], Estimate) else first[0]["name"]
        bad_figure = at_bad.find(figure)
        if bad_figure is None:
            names = [e.name for e in at_bad.estimates]
            raise ValueError(
                f"--figure {figure!r}: not a figure of the A/B (timed figures: "
                f"{', '.join(names) or 'none'}; or an exact figure that changed)"
            )
        if judge(at_bad, figure, bad_figure)[0] != "bad":
            return BisectResult(
                figure,
                None,
                "",
                bad_figure,
                [],
                f"BAD is not slower than GOOD on {figure}: nothing to bisect",
            )
        log(f"bisecting on {figure}")
        effects = {bad_c: bad_figure}
        steps = []
        try:
            _bisect_git(repo, "start", "--no-checkout", bad_c, good_c)
            while True:
                cand = _git(repo, "rev-parse", "BISECT_HEAD").stdout.strip()
                try:
                    result = ab_at(cand, figure)
                    verdict, why = judge(result, figure, bad_figure)
                    if verdict == "bad":
                        effects[cand] = result.find(figure)
                except ABError as exc:
                    verdict, why = "skip", str(exc)
                steps.append({"commit": cand, "verdict": verdict, "why": why})
                log(f"  {cand[:12]}: {verdict} ({why})")
                out = _bisect_git(repo, verdict)
                text = out.stdout
                if "is the first bad commit" in text:
                    first_bad = text.split()[0]
                    break
                if "only 'skip'ped commits left" in text:
                    return BisectResult(
                        figure, None, "", None, steps, "only skipped commits left: " + text
                    )
        finally:
            _git(repo, "bisect", "reset")
    subject = _git(repo, "log", "-1", "--format=%s", first_bad).stdout.strip()
    effect = effects.get(first_bad)
    return BisectResult(figure, first_bad, subject, effect, steps, "")


def _bisect_git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    out = _git(repo, "bisect", *args)
    # git exits non-zero once it has an answer (found, or only skipped commits left).
    done = ("is the first bad commit", "only 'skip'ped commits left")
    if out.returncode != 0 and not any(d in out.stdout for d in done):
        raise ABError(f"git bisect {' '.join(args)}: {out.stderr.strip()}", "git")
    return out


def bisect_text(result: BisectResult) -> str:
    if result.first_bad is None:
        return f"bisect: {result.message}"
    e = result.effect
    if isinstance(e, Estimate):
        effect = f"{e.name} {e.effect:+.2%} {e.interval_text()} ({e.verdict}) against GOOD"
    elif isinstance(e, dict):
        effect = f"{e['name']}: {e['base']} -> {e['new']}"
    else:
        effect = "(not measured)"
    return (
        f"first bad commit: {result.first_bad} {result.subject}\n  {effect}\n"
        f"  ({len(result.steps)} candidate(s) measured)"
    )
