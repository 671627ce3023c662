"""perf_baselines/<gpu-slug>/: the store of the gate's baselines and their limits.

One folder per GPU model (``kernels.runtime.gpu_slug()``, e.g. nvidia-h100-80gb-hbm3), so
that an H200 is never compared with H100 numbers:

- ``baseline.json``: a run of the gate's stages (profiling/measure.py) on that GPU, plus the
  limits derived from it (TOLERANCE_RULES). Written only by ``python -m profiling record``.
- ``<machine-id>/NNNN_<name>.json``: pytest-benchmark kernel benchmark runs (``bench``).

Here: reading (``load_baseline``), ``validate`` (a baseline's schema and types, checked before
anything is measured), ``check_comparable`` (whether a run can be compared with it), writing
(``write_baseline``) and the tolerances fixed at record time (``make_baseline``). The verdict
is profiling/gate.py's. A baseline that is missing, unreadable, malformed, for another GPU
model or for another model or plan raises a BaselineError: the gate never passes for want of
a baseline.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

from kernels.runtime import gpu_slug

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_ROOT = REPO_ROOT / "perf_baselines"
BASELINE_FILE = "baseline.json"
BASELINE_SCHEMA = "fusionguard-baseline/2"
RECORD_COMMAND = (
    "python -m profiling record   (tox -e record) on this GPU, then commit it (a GPU model "
    "with no tuned tables either: python -m profiling onboard)"
)

KERNEL_RATIO_FLOOR, KERNEL_RATIO_CAP = 0.02, 0.04
TOK_S_FLOOR, TOK_S_CAP = 0.04, 0.10
SPEEDUP_FLOOR_ABS, SPEEDUP_GAIN_SHARE, SPEEDUP_GAIN_CAP = 0.005, 0.30, 0.45
CROSS_PROCESS_FACTOR = 1.25
# Written into every baseline; the rules themselves live in one place only.
TOLERANCE_RULES = 'docs/definitions.md, "Tolerances"'


class BaselineError(Exception):
    """No usable baseline: the gate cannot pass. ``str()`` says what to do."""


class BaselineMissing(BaselineError):
    pass


class BaselineCorrupt(BaselineError):
    pass


class ForeignBaseline(BaselineError):
    """The baseline was measured on another GPU model."""


class BaselineMismatch(BaselineError):
    """The baseline was measured with another model, plan or set of fusions."""


class NotYetBaselined(BaselineMismatch):
    """Fusions are registered that the baseline does not know: nothing gates them until it is
    recorded again (a fusion just added: docs/add-a-fusion.md)."""


def not_yet_baselined(current_model: dict, baseline_model: dict) -> list[str]:
    """The fusions of a run's model summary that the baseline's does not list."""
    return sorted(set(current_model["fusions"]) - set(baseline_model["fusions"]))


def baseline_dir(slug: str | None = None, root: str | Path = BASELINE_ROOT) -> Path:
    return Path(root) / (gpu_slug() if slug is None else slug)


def baseline_path(slug: str | None = None, root: str | Path = BASELINE_ROOT, tp: int = 1) -> Path:
    """<root>/<gpu-slug>/baseline.json; tensor parallel over N > 1 ranks: <gpu-slug>/tpN/
    (a sharded run gates only runs with as many ranks)."""
    folder = baseline_dir(slug, root)
    return (folder if tp == 1 else folder / f"tp{tp}") / BASELINE_FILE


def record_command(tp: int = 1) -> str:
    if tp == 1:
        return RECORD_COMMAND
    return (
        f"torchrun --nproc-per-node {tp} -m profiling record on {tp} GPUs of this model, then "
        "commit it"
    )


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


def mad_rel(values) -> float:
    med = statistics.median(values)
    return statistics.median(abs(x - med) for x in values) / med


def _mad_abs(values) -> float:
    med = statistics.median(values)
    return statistics.median(abs(x - med) for x in values)


def _across(entry: dict, *, relative: bool) -> float:
    """CROSS_PROCESS_FACTOR x the largest deviation of the runs' figures from their median."""
    runs = entry.get("runs") or []
    if len(runs) < 2:
        return 0.0
    med = statistics.median(runs)
    worst = max(abs(r - med) for r in runs)
    return CROSS_PROCESS_FACTOR * (worst / med if relative else worst)


def ratio_limit(entry: dict) -> dict:
    spread = max(4 * mad_rel(entry["rounds"]), _across(entry, relative=True))
    tol = min(KERNEL_RATIO_CAP, max(KERNEL_RATIO_FLOOR, spread))
    return {"tolerance": tol, "max": entry["ratio"] * (1 + tol)}


def tok_s_limit(entry: dict) -> dict:
    spread = max(4 * mad_rel(entry["tok_s"]), _across(entry, relative=True))
    tol = min(TOK_S_CAP, max(TOK_S_FLOOR, spread))
    return {"tolerance": tol, "min": entry["median"] * (1 - tol)}


def speedup_limit(entry: dict) -> dict:
    gain = entry["median"] - 1
    noise = max(4 * _mad_abs(entry["rounds"]), _across(entry, relative=False))
    if gain <= 2 * max(noise, SPEEDUP_FLOOR_ABS):
        return {
            "gated": False,
            "reason": f"gain {gain:+.2%} is not above twice its noise (4 x MAD = {noise:.2%})",
        }
    tol = min(SPEEDUP_GAIN_CAP * gain, max(SPEEDUP_FLOOR_ABS, noise, SPEEDUP_GAIN_SHARE * gain))
    return {"gated": True, "tolerance": tol, "floor": entry["median"] - tol}


def make_baseline(report: dict) -> dict:
    """A run of the gate's stages plus its limits (TOLERANCE_RULES)."""
    if report.get("interpreted") or report.get("gpu_slug") in (None, "cpu"):
        raise ValueError(
            "refusing to make a baseline from a CPU/interpreter run: its timings mean nothing"
        )
    for key in ("launches", "kernel_ratios", "e2e"):
        if not report.get(key):
            raise ValueError(f"the run has no {key!r} measurements: cannot make a baseline")
    baseline = copy.deepcopy(report)
    for key in ("gate", "remeasured"):
        baseline.pop(key, None)
    baseline["schema"] = BASELINE_SCHEMA
    baseline["tolerance_rules"] = TOLERANCE_RULES
    baseline.pop("numerics", None)
    limits = ("tolerance", "max", "min", "floor", "gated", "reason")
    for entry in baseline["kernel_ratios"].values():
        entry.update(ratio_limit(entry))
    for per_batch in baseline["e2e"].values():
        default = per_batch["variants"]["default"]
        for k in limits:
            default.pop(k, None)
        default.update(tok_s_limit(default))
        for entry in per_batch["speedups"].values():
            for k in limits:
                entry.pop(k, None)
            entry.update(speedup_limit(entry))
    return baseline


def combine_runs(runs: list[dict]) -> dict:
    """One run from several runs of the gate's stages in separate processes (their reports, or
    the gate's --out files, or baselines). They must be of one GPU model, model, plan and set
    of fusions, and count the same launches; kernel ratios, tok/s and speed-ups become the
    median over runs, with every run's figure kept in ``runs``."""
    if not runs:
        raise ValueError("no runs to combine")
    first = runs[0]
    for i, run in enumerate(runs[1:], 2):
        check_comparable(run, first)
        for key, e in first["launches"].items():
            other = run["launches"].get(key)
            fields = ("kernels_per_step", "memcpy_per_step", "memset_per_step")
            same = other is not None and all(other[f] == e[f] for f in fields)
            same = same and {
                n: (s["instances"], s["per_instance"]) for n, s in e["segments"].items()
            } == {n: (s["instances"], s["per_instance"]) for n, s in other["segments"].items()}
            if not same:
                raise BaselineMismatch(f"run {i} counts other launches than run 1 at {key}")
    combined = copy.deepcopy(first)
    for key, e in combined["kernel_ratios"].items():
        ratios = [r["kernel_ratios"][key]["ratio"] for r in runs]
        e.update(
            ratio=statistics.median(ratios),
            runs=ratios,
            fused_us=statistics.median(r["kernel_ratios"][key]["fused_us"] for r in runs),
            reference_us=statistics.median(r["kernel_ratios"][key]["reference_us"] for r in runs),
        )
    for bkey, b in combined["e2e"].items():
        for name, v in b["variants"].items():
            medians = [r["e2e"][bkey]["variants"][name]["median"] for r in runs]
            v.update(median=statistics.median(medians), runs=medians)
        for name, s in b["speedups"].items():
            medians = [r["e2e"][bkey]["speedups"][name]["median"] for r in runs]
            s.update(median=statistics.median(medians), runs=medians)
    for stale in ("gate", "remeasured", "numerics", "tolerance_rules", "schema"):
        combined.pop(stale, None)
    combined["combined_runs"] = [{"commit": r.get("commit"), "date": r.get("date")} for r in runs]
    return combined


# --------------------------------------------------------------------------------------------
# Validation: schema and types, before anything is measured
# --------------------------------------------------------------------------------------------


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pos(x) -> bool:
    return _num(x) and x > 0


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _nums(x, n_min: int = 1) -> bool:
    return isinstance(x, list) and len(x) >= n_min and all(_pos(v) for v in x)


def _tolerance(x) -> bool:
    return _num(x) and 0 < x <= TOK_S_CAP


def validate(baseline) -> list[str]:
    """Every problem of ``baseline``'s schema and types (empty: usable)."""
    if not isinstance(baseline, dict):
        return ["the top level is not a JSON object"]
    p: list[str] = []

    def need(cond, what):
        if not cond:
            p.append(what)

    need(
        baseline.get("schema") == BASELINE_SCHEMA,
        f"schema is {baseline.get('schema')!r}, expected {BASELINE_SCHEMA!r}",
    )
    for field in ("gpu", "gpu_slug", "date"):
        need(isinstance(baseline.get(field), str), f"{field!r} is not a string")
    model = baseline.get("model")
    if not isinstance(model, dict):
        return [*p, "'model' is not an object"]
    need(
        isinstance(model.get("config"), dict) and all(_int(v) for v in model["config"].values()),
        "model.config is not dims",
    )
    need(isinstance(model.get("dtype"), str), "model.dtype is not a string")
    need(
        isinstance(model.get("default_fusions"), list)
        and all(isinstance(n, str) for n in model["default_fusions"]),
        "model.default_fusions is not a list of names",
    )
    fusions = model.get("fusions")
    if not isinstance(fusions, dict) or not fusions:
        p.append("model.fusions is not a non-empty object")
    else:
        for name, f in fusions.items():
            ok = isinstance(f, dict) and all(
                _int(f.get(k)) for k in ("instances_per_step", "fused_kernels", "span_ops")
            )
            need(ok, f"model.fusions.{name} lacks integer instances and kernel counts")
    plan = baseline.get("plan")
    if not isinstance(plan, dict):
        p.append("'plan' is not an object")
    else:
        for k in ("prompt_len", "new_tokens", "rounds", "kernel_rounds", "launch_steps"):
            need(_int(plan.get(k)) and plan[k] > 0, f"plan.{k} is not a positive integer")
        for k in ("batches", "kernel_rows", "numerics_rows"):
            v = plan.get(k)
            need(
                isinstance(v, list) and v and all(_int(x) and x > 0 for x in v),
                f"plan.{k} is not a list of positive integers",
            )
    launches = baseline.get("launches")
    if not isinstance(launches, dict) or not launches:
        p.append("'launches' is not a non-empty object")
    else:
        for key, e in launches.items():
            if not isinstance(e, dict):
                p.append(f"launches.{key} is not an object")
                continue
            for k in ("kernels_per_step", "memcpy_per_step", "memset_per_step"):
                need(_num(e.get(k)) and e[k] >= 0, f"launches.{key}.{k} is not a count")
            need(e.get("mode") in ("eager", "graph"), f"launches.{key}.mode is not eager/graph")
            need(_int(e.get("batch")), f"launches.{key}.batch is not an integer")
            segs = e.get("segments")
            if not isinstance(segs, dict):
                p.append(f"launches.{key}.segments is not an object")
                continue
            for s, v in segs.items():
                need(
                    isinstance(v, dict)
                    and _num(v.get("instances"))
                    and _num(v.get("per_instance")),
                    f"launches.{key}.segments.{s} lacks instances/per_instance",
                )
    ratios = baseline.get("kernel_ratios")
    if not isinstance(ratios, dict) or not ratios:
        p.append("'kernel_ratios' is not a non-empty object")
    else:
        for key, e in ratios.items():
            ok = (
                isinstance(e, dict)
                and _pos(e.get("ratio"))
                and _tolerance(e.get("tolerance"))
                and _pos(e.get("max"))
                and _nums(e.get("rounds"))
            )
            need(ok, f"kernel_ratios.{key} lacks a positive ratio, tolerance (0, 0.1], max, rounds")
    e2e = baseline.get("e2e")
    if not isinstance(e2e, dict) or not e2e:
        p.append("'e2e' is not a non-empty object")
    else:
        for key, b in e2e.items():
            if not isinstance(b, dict) or not isinstance(b.get("variants"), dict):
                p.append(f"e2e.{key} lacks variants")
                continue
            d = b["variants"].get("default")
            ok = isinstance(d, dict) and _pos(d.get("median")) and _tolerance(d.get("tolerance"))
            need(
                ok and _pos(d.get("min")), f"e2e.{key}.variants.default lacks median/tolerance/min"
            )
            sp = b.get("speedups")
            if not isinstance(sp, dict) or "all" not in sp:
                p.append(f"e2e.{key}.speedups lacks 'all'")
                continue
            for name, s in sp.items():
                if not isinstance(s, dict) or not isinstance(s.get("gated"), bool):
                    p.append(f"e2e.{key}.speedups.{name} lacks 'gated'")
                    continue
                if s["gated"]:
                    ok = _pos(s.get("median")) and _pos(s.get("floor")) and _num(s.get("tolerance"))
                    ok = ok and 0 < s["tolerance"] <= TOK_S_CAP * 10 and s["floor"] > 1
                    need(ok, f"e2e.{key}.speedups.{name} lacks median, tolerance, floor > 1")
                else:
                    need(isinstance(s.get("reason"), str), f"e2e.{key}.speedups.{name}: no reason")
    return p


def load_baseline(
    slug: str | None = None, *, root: str | Path = BASELINE_ROOT, tp: int = 1
) -> dict:
    """This GPU's baseline (for ``tp`` ranks), validated; BaselineError (saying what to do)
    when unusable."""
    slug = gpu_slug() if slug is None else slug
    path = baseline_path(slug, root, tp)
    how = record_command(tp)
    if not path.is_file():
        raise BaselineMissing(f"no baseline for {slug} ({path}): record one with {how}")
    try:
        baseline = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineCorrupt(f"{path} is not valid JSON ({exc}): re-record it with {how}") from exc
    problems = validate(baseline)
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        raise BaselineCorrupt(
            f"{path} is not a usable fusionguard baseline ({shown}): re-record it with {how}"
        )
    if baseline["gpu_slug"] != slug:
        raise ForeignBaseline(
            f"{path} was measured on {baseline['gpu']!r} ({baseline['gpu_slug']}), not on "
            f"{slug}: numbers from one GPU model never gate another; record this GPU's with "
            f"{how}"
        )
    return baseline


def check_comparable(current: dict, baseline: dict) -> None:
    """Raise ForeignBaseline / BaselineMismatch unless the two runs can be compared."""
    if current.get("gpu_slug") != baseline.get("gpu_slug"):
        raise ForeignBaseline(
            f"this run is on {current.get('gpu')!r} ({current.get('gpu_slug')}) but the "
            f"baseline on {baseline.get('gpu')!r} ({baseline.get('gpu_slug')}): never compared"
        )
    cm, bm = current["model"], baseline["model"]
    if cm.get("tp", 1) != bm.get("tp", 1):
        raise BaselineMismatch(
            f"this run is tensor parallel over {cm.get('tp', 1)} rank(s), the baseline over "
            f"{bm.get('tp', 1)}: each TP size has its own baseline (perf_baselines/<gpu>/tpN/)"
        )
    for field in ("config", "dtype"):
        if cm[field] != bm[field]:
            raise BaselineMismatch(
                f"model {field} differs from the baseline's ({cm[field]} vs {bm[field]}): "
                f"measure the baseline's model, or re-record with --force"
            )
    new = not_yet_baselined(cm, bm)
    gone = sorted(set(bm["fusions"]) - set(cm["fusions"]))
    if gone:
        raise BaselineMismatch(
            "the registered fusions differ from the baseline's ("
            + ", ".join([*(f"new: {n}" for n in new), *(f"gone: {g}" for g in gone)])
            + "): re-record the baseline with --force so that they are gated"
        )
    if new:
        raise NotYetBaselined(
            f"not yet baselined: {', '.join(new)} (registered, not in this baseline): record the "
            f"baseline again with --force so that it is gated ({record_command(cm.get('tp', 1))})"
        )
    for field in ("prompt_len", "new_tokens", "batches", "kernel_rows", "launch_steps"):
        ours, theirs = current["plan"].get(field), baseline["plan"].get(field)
        if ours != theirs:
            raise BaselineMismatch(
                f"plan {field} is {ours}, the baseline used {theirs}: measure with the "
                "baseline's plan, or re-record with --force"
            )


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


def summary_line(baseline: dict) -> str:
    b1 = baseline["e2e"].get("b1") or next(iter(baseline["e2e"].values()))
    return (
        f"commit {baseline.get('commit')} of {baseline.get('date')}: default "
        f"{b1['variants']['default']['median']:.1f} tok/s, speed-up "
        f"{b1['speedups']['all']['median']:.3f}x"
    )


def write_baseline(
    report: dict, *, root: str | Path = BASELINE_ROOT, force: bool = False
) -> tuple[Path, str | None]:
    """Write ``report`` as this GPU's baseline. Refuses (BaselineMismatch) to replace a baseline
    of another model, plan or set of fusions unless ``force``. Returns the path and a line
    describing what was replaced (None: nothing was there)."""
    baseline = make_baseline(report)
    path = baseline_path(report["gpu_slug"], root, report["model"].get("tp", 1))
    replaced = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and not validate(old):
            if not force:
                check_comparable(report, old)  # raises on another model, plan or fusions
            replaced = summary_line(old)
        elif not force:
            raise BaselineCorrupt(
                f"{path} exists but is not a usable baseline: pass --force to replace it"
            )
        else:
            replaced = "an unusable file"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
    return path, replaced


# --------------------------------------------------------------------------------------------
# Kernel benchmarks: pytest-benchmark's saved runs (the verdict: gate.compare_kernel_benchmarks)
# --------------------------------------------------------------------------------------------


def kernel_benchmark_file(slug: str | None = None, *, root: str | Path = BASELINE_ROOT) -> Path:
    """The newest saved pytest-benchmark run under perf_baselines/<slug>/<machine-id>/."""
    folder = baseline_dir(slug, root)
    saved = sorted(folder.glob("*/[0-9][0-9][0-9][0-9]_*.json"), key=lambda p: (p.name, p.parent))
    if not saved:
        raise BaselineMissing(
            f"no pytest-benchmark baseline under {folder}/<machine-id>/: record one with "
            f"python -m profiling bench --save   on this GPU (or onboard it: python -m "
            f"profiling onboard)"
        )
    return saved[-1]


def load_kernel_benchmarks(path: Path, slug: str | None = None) -> dict:
    """A saved pytest-benchmark JSON, checked to be readable and from this GPU model."""
    slug = gpu_slug() if slug is None else slug
    try:
        data = json.loads(Path(path).read_text())
        benchmarks = data["benchmarks"]
        machine = data["machine_info"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BaselineCorrupt(f"{path} is not a pytest-benchmark JSON ({exc})") from exc
    if not benchmarks:
        raise BaselineCorrupt(f"{path} holds no benchmarks")
    if machine.get("gpu_slug") != slug:
        raise ForeignBaseline(
            f"{path} was measured on {machine.get('gpu')!r} ({machine.get('gpu_slug')}), not "
            f"on {slug}"
        )
    return data


def pytest_benchmark_compare_args(
    path: Path, slug: str | None = None, *, root: str | Path = BASELINE_ROOT
) -> list[str]:
    """Arguments that make pytest-benchmark show each kernel median beside the saved run's.

    The saved file is passed by path: pytest-benchmark otherwise looks only in the current
    machine-id folder. The pass or fail is gate.compare_kernel_benchmarks' (per benchmark),
    not pytest-benchmark's one threshold for every benchmark.
    """
    return [
        f"--benchmark-storage=file://{baseline_dir(slug, root)}",
        f"--benchmark-compare={path}",
    ]


def pytest_benchmark_save_args(
    slug: str | None = None, *, root: str | Path = BASELINE_ROOT, name: str = "kernels"
) -> list[str]:
    """Arguments that save a pytest-benchmark run as this GPU's kernel benchmark baseline."""
    return [
        f"--benchmark-storage=file://{baseline_dir(slug, root)}",
        f"--benchmark-save={name}",
    ]
