"""perf_baselines/<gpu-slug>/: read, write and compare against stored results (DESIGN.md D6).

One folder per GPU model (``kernels.runtime.gpu_slug()``, e.g. nvidia-h100-80gb-hbm3):

- ``throughput.json``: a throughput report (profiling/throughput.py) from a real run, plus the
  gate's limits derived from that run (TOLERANCE_FORMULA below). Written only by
  ``python -m profiling record``, never by tests.
- ``<machine-id>/NNNN_<name>.json``: pytest-benchmark runs saved with
  ``--benchmark-storage=file://perf_baselines/<slug> --benchmark-save=<name>``
  (pytest-benchmark adds the machine-id folder, e.g. Linux-CPython-3.12-64bit).

``compare(current, baseline)`` is pure logic on two report dicts, so CPU CI tests it on
synthetic files. A baseline that is missing, unreadable, for another GPU model or for another
model config raises a BaselineError: the gate never passes for want of a baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
from pathlib import Path

from kernels.runtime import gpu_slug

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE_ROOT = REPO_ROOT / "perf_baselines"
THROUGHPUT_FILE = "throughput.json"
BASELINE_SCHEMA = "fusionguard-throughput-baseline/1"
RECORD_COMMAND = "python -m profiling record   (tox -e record) on this GPU, then commit it"

# Noise floor for the fused tok/s tolerance: repeats inside one process can agree to 0.5%
# while separate processes on a shared machine differ by a few percent (clocks, placement).
TOLERANCE_FLOOR = 0.05
# Kernel medians (pytest-benchmark): never gate tighter than this.
KERNEL_COMPARE_FLOOR = 0.05
TOLERANCE_FORMULA = (
    "per mode, over the baseline's timed repeats of fused decode tok/s: "
    "tolerance = max(3 * mad_rel, spread_rel, 0.05), mad_rel = median(|x - median|) / median, "
    "spread_rel = (max - min) / median. The gate fails when fused tok/s median < "
    "baseline median * (1 - tolerance). speedup_floor = speedup * (1 - (tolerance_fused + "
    "tolerance_unfused)) (relative errors of a ratio of two medians add). Launches per token "
    "(all kernels, o_proj_residual, memcpy, memset) are exact: any rise fails. Kernel medians: "
    "pytest-benchmark --benchmark-compare-fail=median:X%, X = max(5, 3 * max over benchmarks of "
    "100 * iqr / median), rounded up."
)
# What must be equal for two reports to be comparable at all.
_SAME = ("config", "dtype")
_SAME_SETTINGS = ("prompt_len", "new_tokens", "launch_steps")
_LAUNCH_FIELDS = (
    "launches_per_token",
    "o_proj_residual_per_token",
    "o_proj_residual_per_layer",
    "memcpy_per_token",
    "memset_per_token",
)


class BaselineError(Exception):
    """No usable baseline: the gate cannot pass. ``str()`` says what to do."""


class BaselineMissing(BaselineError):
    pass


class BaselineCorrupt(BaselineError):
    pass


class ForeignBaseline(BaselineError):
    """The baseline was measured on another GPU model."""


class BaselineMismatch(BaselineError):
    """The baseline was measured on another model config or with other settings."""


def baseline_dir(slug: str | None = None, root: str | Path = BASELINE_ROOT) -> Path:
    return Path(root) / (gpu_slug() if slug is None else slug)


# --------------------------------------------------------------------------------------------
# Throughput baseline: derive, write, read
# --------------------------------------------------------------------------------------------


def tolerance(entry: dict) -> float:
    """The fused/unfused entry's tok/s tolerance from its repeats (TOLERANCE_FORMULA)."""
    repeats = entry["tok_s_repeats"]
    med = statistics.median(repeats)
    mad = statistics.median(abs(x - med) for x in repeats)
    spread = (max(repeats) - min(repeats)) / med
    return max(3 * mad / med, spread, TOLERANCE_FLOOR)


def make_baseline(report: dict) -> dict:
    """A throughput report plus the gate's limits for every mode (TOLERANCE_FORMULA)."""
    if report.get("interpreted") or report.get("gpu_slug") in (None, "cpu"):
        raise ValueError(
            "refusing to make a baseline from a CPU/interpreter run: its timings mean nothing"
        )
    baseline = copy.deepcopy(report)
    baseline["schema"] = BASELINE_SCHEMA
    baseline["tolerance_formula"] = TOLERANCE_FORMULA
    for key, entry in baseline["modes"].items():
        if "fused" not in entry or "unfused" not in entry:
            raise ValueError(f"mode {key} lacks a fused or unfused measurement")
        for path in ("fused", "unfused"):
            if entry[path].get("launches_per_token") is None:
                raise ValueError(f"mode {key} {path} has no launch counts: cannot gate launches")
        tol_f, tol_u = tolerance(entry["fused"]), tolerance(entry["unfused"])
        entry["fused_tok_s_tolerance"] = tol_f
        entry["fused_tok_s_min"] = entry["fused"]["tok_s_median"] * (1 - tol_f)
        entry["speedup_tolerance"] = tol_f + tol_u
        entry["speedup_floor"] = entry["speedup"] * (1 - (tol_f + tol_u))
    return baseline


def write_baseline(
    report: dict, *, root: str | Path = BASELINE_ROOT, kernel_compare_fail: str | None = None
) -> Path:
    """Write ``report`` as perf_baselines/<its gpu slug>/throughput.json (record command only)."""
    baseline = make_baseline(report)
    if kernel_compare_fail is not None:
        baseline["kernel_compare_fail"] = kernel_compare_fail
    path = baseline_dir(report["gpu_slug"], root) / THROUGHPUT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
    return path


def load_baseline(slug: str | None = None, *, root: str | Path = BASELINE_ROOT) -> dict:
    """This GPU's throughput baseline; BaselineError (with what to do) when unusable."""
    slug = gpu_slug() if slug is None else slug
    path = baseline_dir(slug, root) / THROUGHPUT_FILE
    if not path.is_file():
        raise BaselineMissing(
            f"no throughput baseline for {slug} ({path}): record one with {RECORD_COMMAND}"
        )
    try:
        baseline = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineCorrupt(
            f"{path} is not valid JSON ({exc}): re-record it with {RECORD_COMMAND}"
        ) from exc
    problems = _schema_problems(baseline)
    if problems:
        raise BaselineCorrupt(
            f"{path} is not a fusionguard throughput baseline ({'; '.join(problems)}): "
            f"re-record it with {RECORD_COMMAND}"
        )
    if baseline["gpu_slug"] != slug:
        raise ForeignBaseline(
            f"{path} was measured on {baseline['gpu']!r} ({baseline['gpu_slug']}), not on "
            f"{slug}: numbers from one GPU model never gate another; record this GPU's with "
            f"{RECORD_COMMAND}"
        )
    return baseline


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _schema_problems(baseline) -> list[str]:
    if not isinstance(baseline, dict):
        return ["top level is not an object"]
    problems = []
    if baseline.get("schema") != BASELINE_SCHEMA:
        problems.append(f"schema is {baseline.get('schema')!r}, expected {BASELINE_SCHEMA!r}")
    for field in ("gpu", "gpu_slug", "config", "dtype", "settings", "modes"):
        if field not in baseline:
            problems.append(f"missing {field!r}")
    modes = baseline.get("modes")
    if not isinstance(modes, dict) or not modes:
        problems.append("no measured modes")
        return problems
    for key, entry in modes.items():
        if not isinstance(entry, dict):
            problems.append(f"mode {key!r} is not an object")
            continue
        for field in ("fused", "unfused", "fused_tok_s_min", "speedup", "speedup_floor"):
            if field not in entry:
                problems.append(f"mode {key!r} lacks {field!r}")
        for path in ("fused", "unfused"):
            sub = entry.get(path)
            if not isinstance(sub, dict):
                continue
            for field in ("tok_s_median", *_LAUNCH_FIELDS):
                if not _is_number(sub.get(field)):
                    problems.append(f"mode {key!r} {path} {field!r} is not a number")
            if _is_number(sub.get("tok_s_median")) and not sub["tok_s_median"] > 0:
                problems.append(f"mode {key!r} {path} tok_s_median is not positive")
    return problems


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    kind: str  # "launches", "tok_s", "speedup", "numerics", "mode"
    mode: str | None
    message: str
    ok: bool


@dataclasses.dataclass
class GateResult:
    checks: list[Check]
    notes: list[str]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and bool(self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def failed_kinds(self) -> set[str]:
        return {c.kind for c in self.failures}

    def summary(self) -> str:
        lines = [f"gate: {'PASS' if self.ok else 'FAIL'} ({len(self.checks)} checks)"]
        lines += [f"  FAIL [{c.kind}] {c.mode or ''} {c.message}" for c in self.failures]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_comparable(current: dict, baseline: dict) -> None:
    """Raise ForeignBaseline / BaselineMismatch unless the two runs can be compared."""
    if current.get("gpu_slug") != baseline.get("gpu_slug"):
        raise ForeignBaseline(
            f"current run is on {current.get('gpu')!r} ({current.get('gpu_slug')}) but the "
            f"baseline on {baseline.get('gpu')!r} ({baseline.get('gpu_slug')}): never compared"
        )
    for field in _SAME:
        if current.get(field) != baseline.get(field):
            raise BaselineMismatch(
                f"{field} differs from the baseline's ({current.get(field)} vs "
                f"{baseline.get(field)}): measure with the baseline's, or re-record"
            )
    for field in _SAME_SETTINGS:
        ours, theirs = current["settings"].get(field), baseline["settings"].get(field)
        if ours != theirs:
            raise BaselineMismatch(
                f"setting {field} is {ours}, the baseline used {theirs}: measure with the "
                "baseline's settings"
            )


def compare(current: dict, baseline: dict, *, numerics=None) -> GateResult:
    """Gate ``current`` (a throughput report) against ``baseline`` (make_baseline's output).

    Fails on: any rise of launches per token (total, o_proj_residual, memcpy, memset) in any
    mode; fused tok/s below the baseline's ``fused_tok_s_min``; fused/unfused speed-up below
    ``speedup_floor``; a mode of the baseline not measured; and, when ``numerics`` (a
    profiling.numerics.NumericsResult, or a list of them) is given, a numerics failure.
    Raises BaselineError when the two cannot be compared.
    """
    check_comparable(current, baseline)
    checks: list[Check] = []
    notes: list[str] = []
    for field in ("torch", "triton", "cuda"):
        if current.get(field) != baseline.get(field):
            notes.append(
                f"{field} {current.get(field)} differs from the baseline's {baseline.get(field)}"
            )
    for key, base in sorted(baseline["modes"].items()):
        cur = current["modes"].get(key)
        if cur is None or "fused" not in cur or "unfused" not in cur:
            checks.append(Check("mode", key, "not measured in the current run", False))
            continue
        for path in ("fused", "unfused"):
            for field in _LAUNCH_FIELDS:
                now, then = cur[path].get(field), base[path][field]
                if now is None:
                    checks.append(Check("launches", key, f"{path} {field}: not counted", False))
                elif now > then:
                    checks.append(
                        Check("launches", key, f"{path} {field} rose: {now:g} > {then:g}", False)
                    )
                else:
                    checks.append(Check("launches", key, f"{path} {field} {now:g}", True))
                    if now < then:
                        notes.append(
                            f"{key} {path} {field} fell ({now:g} < {then:g}): re-record the "
                            "baseline to lock the gain in"
                        )
        fused = cur["fused"]["tok_s_median"]
        limit = base["fused_tok_s_min"]
        checks.append(
            Check(
                "tok_s",
                key,
                f"fused {fused:.1f} tok/s vs baseline {base['fused']['tok_s_median']:.1f} "
                f"(min {limit:.1f}, tolerance {base.get('fused_tok_s_tolerance', 0):.1%})",
                fused >= limit,
            )
        )
        speedup = fused / cur["unfused"]["tok_s_median"]
        checks.append(
            Check(
                "speedup",
                key,
                f"fused/unfused {speedup:.3f}x vs baseline {base['speedup']:.3f}x "
                f"(floor {base['speedup_floor']:.3f}x)",
                speedup >= base["speedup_floor"],
            )
        )
    if numerics is not None:
        for result in numerics if isinstance(numerics, (list, tuple)) else [numerics]:
            checks.append(Check("numerics", None, result.summary(), result.ok))
    return GateResult(checks, notes)


# --------------------------------------------------------------------------------------------
# Kernel medians: pytest-benchmark's own compare
# --------------------------------------------------------------------------------------------


def kernel_benchmark_file(slug: str | None = None, *, root: str | Path = BASELINE_ROOT) -> Path:
    """The newest saved pytest-benchmark run under perf_baselines/<slug>/<machine-id>/."""
    folder = baseline_dir(slug, root)
    saved = sorted(folder.glob("*/[0-9][0-9][0-9][0-9]_*.json"), key=lambda p: (p.name, p.parent))
    if not saved:
        raise BaselineMissing(
            f"no pytest-benchmark baseline under {folder}/<machine-id>/: record one with "
            f"python -m profiling record --kernels   (tox -e record) on this GPU"
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


def kernel_compare_fail(data: dict) -> str:
    """``median:X%`` for --benchmark-compare-fail from a saved run's spread (TOLERANCE_FORMULA)."""
    worst = max(b["stats"]["iqr"] / b["stats"]["median"] for b in data["benchmarks"])
    percent = math.ceil(100 * max(KERNEL_COMPARE_FLOOR, 3 * worst))
    return f"median:{percent}%"


def pytest_benchmark_compare_args(
    slug: str | None = None, *, root: str | Path = BASELINE_ROOT
) -> list[str]:
    """Arguments that make pytest-benchmark fail on kernel medians past this GPU's threshold.

    The saved file is passed by path: pytest-benchmark otherwise looks only in the current
    machine-id folder, and when it finds nothing it warns and PASSES.
    """
    slug = gpu_slug() if slug is None else slug
    path = kernel_benchmark_file(slug, root=root)
    data = load_kernel_benchmarks(path, slug)
    threshold = None
    throughput = baseline_dir(slug, root) / THROUGHPUT_FILE
    if throughput.is_file():
        try:
            threshold = json.loads(throughput.read_text()).get("kernel_compare_fail")
        except (OSError, json.JSONDecodeError):
            threshold = None
    return [
        f"--benchmark-storage=file://{baseline_dir(slug, root)}",
        f"--benchmark-compare={path}",
        f"--benchmark-compare-fail={threshold or kernel_compare_fail(data)}",
    ]


def pytest_benchmark_save_args(
    slug: str | None = None, *, root: str | Path = BASELINE_ROOT, name: str = "baseline"
) -> list[str]:
    """Arguments that save a pytest-benchmark run as this GPU's kernel baseline."""
    return [
        f"--benchmark-storage=file://{baseline_dir(slug, root)}",
        f"--benchmark-save={name}",
    ]
