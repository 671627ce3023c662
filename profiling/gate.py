"""The gate's verdict: measure what this GPU's baseline measured, compare, decide.

Stages (``STAGES``, each for every registered fusion: profiling/measure.py): exact launch
counts; numerics through the engine's fused callables and of the whole engine; kernel time
ratios at decode sizes; end-to-end decode (default tok/s, speed-ups) with the variants
interleaved. ``compare`` turns a run and a baseline (profiling/baselines.py, the store) into
checks and a GateResult: the engine's default fusions, then each stage's checks. A failing
timing check (kernel ratio, tok/s, speed-up) is measured once more before the gate fails
(``retry``): the second measurement decides, and both are printed. A timing figure better than
its baseline by more than its tolerance passes with a note, "faster than baseline: re-record"
(``GateResult.wins``); ``strict`` turns those into failures. ``compare`` is pure logic on two
runs, so CPU CI tests it on synthetic runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from profiling import baselines, measure
from profiling.ranks import Ranks


def default_model(config=None, *, device=None, dtype=torch.bfloat16):
    """The gate's and report's model: the embedded Qwen3-0.6B default, random seeded weights,
    the engine's default fusions."""
    import engine
    from engine.config import default_config

    return engine.build(config or default_config(), dtype=dtype, device=device, seed=0)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: ``run(model, plan, seed, ranks)`` returns its part of a run (under the key
    ``name``); one that ``needs_gpu`` is not measured without one (a note says so)."""

    name: str
    run: Callable[..., Any]
    needs_gpu: bool


def _numerics(model, plan, seed, ranks):
    return [r.to_json() for r in measure.measure_numerics(model, plan, seed, ranks.share)]


STAGES = (
    Stage("launches", lambda model, plan, seed, ranks: measure.measure_launches(model, plan), True),
    Stage("numerics", _numerics, False),
    Stage(
        "kernel_ratios",
        lambda model, plan, seed, ranks: measure.measure_kernel_ratios(model, plan),
        True,
    ),
    Stage("e2e", lambda model, plan, seed, ranks: measure.measure_e2e(model, plan), True),
)


STAGE_NAMES = tuple(stage.name for stage in STAGES)


def run_stages(
    model, plan: measure.Plan, current: dict, *, seed: int, log, ranks: Ranks, stages=None
) -> None:
    """Measure every stage that runs here into ``current`` (the report and the gate);
    ``stages``: only these (names of ``STAGES``; a bisect measures one figure's)."""
    on_gpu = model.device.type == "cuda"
    for stage in STAGES:
        if stages is not None and stage.name not in stages:
            current[f"{stage.name}_note"] = f"not measured: {stage.name} not among the stages asked"
            continue
        if stage.needs_gpu and not on_gpu:
            current[f"{stage.name}_note"] = f"not measured: {stage.name} needs a CUDA GPU"
            continue
        ranks.barrier()  # each stage starts together: no rank's timing includes a peer's wait
        started = time.perf_counter()
        current[stage.name] = stage.run(model, plan, seed, ranks)
        log(f"  {stage.name}: {time.perf_counter() - started:.1f} s")


def measure_gate_stages(
    model, plan: measure.Plan, *, seed: int, log=print, ranks: Ranks | None = None, stages=None
) -> dict:
    """One run of the gate's stages: the report data the comparison reads.

    Without a GPU only numerics run (launch counts, kernel timing and CUDA-graph decode need
    one), as in the CPU report. Under tensor parallelism every rank calls this in lockstep and
    gets rank 0's run back, with every rank's launch data under ``tp`` (measure.tp_summary):
    every rank then compares the same figures and re-measures the same checks."""
    ranks = ranks or Ranks.single()
    current = measure.report_header(model, plan)
    run_stages(model, plan, current, seed=seed, log=log, ranks=ranks, stages=stages)
    if ranks.sharded:
        current["tp"] = measure.tp_summary(model, current, ranks)
    return ranks.share(current)


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    stage: str  # flags, launches, numerics, kernel_ratio, tok_s, speedup
    key: str
    message: str
    ok: bool
    timing: bool = False  # a timing check: measured once more before the gate fails


WIN_NOTE = "faster than baseline: re-record"


@dataclasses.dataclass
class GateResult:
    checks: list[Check]
    notes: list[str]
    # Passing timing figures better than the baseline beyond tolerance: a win nothing explains
    # (or a baseline that no longer describes this tree). Notes, failures under strict().
    wins: list[Check] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def failed_stages(self) -> set[str]:
        return {c.stage for c in self.failures}

    def summary(self) -> str:
        stages = sorted({c.stage for c in self.checks})
        lines = [
            f"gate: {'PASS' if self.ok else 'FAIL'} ({len(self.checks)} checks: "
            + ", ".join(f"{s} {sum(c.stage == s for c in self.checks)}" for s in stages)
            + ")"
        ]
        lines += [f"  FAIL [{c.stage}] {c.key}: {c.message}" for c in self.failures]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  note: [{w.stage}] {w.key} {WIN_NOTE}: {w.message}" for w in self.wins]
        return "\n".join(lines)

    def strict(self) -> GateResult:
        """The verdict of ``gate --strict``: every win a failure."""
        failed = [
            dataclasses.replace(w, ok=False, message=f"{WIN_NOTE}: {w.message}") for w in self.wins
        ]
        return GateResult(self.checks + failed, self.notes, [])

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "notes": self.notes,
            "faster_than_baseline": [dataclasses.asdict(w) for w in self.wins],
        }


def compare_flags(current: dict, baseline: dict) -> list[Check]:
    now, then = current["model"]["default_fusions"], baseline["model"]["default_fusions"]
    return [
        Check(
            "flags",
            "default_fusions",
            f"the engine's default fusions are {now or 'none'}"
            + ("" if now == then else f", the baseline's {then}"),
            now == then,
        )
    ]


def compare_launches(current: dict, baseline: dict, notes: list[str]) -> list[Check]:
    checks = []
    for key, base in sorted(baseline["launches"].items()):
        cur = current["launches"].get(key)
        if cur is None:
            checks.append(Check("launches", key, "not counted in this run", False))
            continue
        for field in ("kernels_per_step", "memcpy_per_step", "memset_per_step"):
            now, then = cur[field], base[field]
            ok = now <= then
            checks.append(Check("launches", f"{key}.{field}", f"{now:g} (baseline {then:g})", ok))
            if now < then:
                notes.append(f"{key} {field} fell ({now:g} < {then:g}): re-record to lock it in")
        for name in sorted(set(base["segments"]) | set(cur["segments"])):
            b, c = base["segments"].get(name), cur["segments"].get(name)
            where = f"{key}.{name}"
            if c is None:
                checks.append(Check("launches", where, "segment not run in this run", False))
            elif b is None:
                checks.append(
                    Check(
                        "launches",
                        where,
                        "a segment the baseline did not run "
                        f"({c['instances']:g} x {c['per_instance']:g} kernels)",
                        False,
                    )
                )
            else:
                ok = c["instances"] == b["instances"] and c["per_instance"] <= b["per_instance"]
                checks.append(
                    Check(
                        "launches",
                        where,
                        f"{c['instances']:g} x {c['per_instance']:g} kernels "
                        f"(baseline {b['instances']:g} x {b['per_instance']:g})",
                        ok,
                    )
                )
    # The config's claim: all unfused minus each variant is exactly what its fusions save.
    model = current["model"]
    for key, cur in sorted(current["launches"].items()):
        off_key = key.replace(f"{cur['variant']}/", "none/", 1)
        off = current["launches"].get(off_key)
        if cur["variant"] == "none" or off is None or cur["batch"] != 1:
            continue
        expected = expected_saving(model, cur["fusions"], off["segments"])
        measured = off["kernels_per_step"] - cur["kernels_per_step"]
        checks.append(
            Check(
                "launches",
                f"{key}.saved",
                f"{measured:g} kernels fewer than all unfused (its fusions' instances x "
                f"(span's ops - fused) say {expected:g})",
                measured == expected,
            )
        )
    return checks


def expected_saving(model_info: dict, fusions, unfused_segments: dict) -> float:
    """Kernels per step that ``fusions`` save over all unfused: per fusion, its instances x
    (what its span's ops launch per instance unfused - its fused kernels). Instances, spans
    and fused kernels come from the config and the registry; what an op launches unfused
    comes from the all-unfused run (cuBLAS may split one GEMM into two kernels)."""
    total = 0.0
    for f in fusions:
        info = model_info["fusions"][f]
        ops = info["spans"][0]
        unfused = sum(unfused_segments[op]["per_instance"] for op in ops if op in unfused_segments)
        total += info["instances_per_step"] * (unfused - info["fused_kernels"])
    return total


def compare_numerics(current: dict) -> list[Check]:
    return [
        Check("numerics", r["name"] + f"/{r['dtype']}/m{r['rows']}", _numerics_message(r), r["ok"])
        for r in current.get("numerics", [])
        if "skipped" not in r  # a check that could not run here (its reason is in the run)
    ]


def _numerics_message(r: dict) -> str:
    text = f"max_abs {r['max_abs']:.3g} (unfused {r['unfused_max_abs']:.3g})"
    return text + ("" if r["ok"] else ": " + "; ".join(r["failures"]))


def compare_kernel_ratios(current: dict, baseline: dict, notes: list[str]) -> list[Check]:
    checks = []
    new = sorted(set(current.get("kernel_ratios", {})) - set(baseline["kernel_ratios"]))
    if new:
        tp = current["model"].get("tp", 1)
        notes.append(
            f"kernel ratios measured but not in the baseline, so not gated: {', '.join(new)} "
            f"(record the baseline again to gate them: {baselines.record_command(tp)})"
        )
    for key, base in sorted(baseline["kernel_ratios"].items()):
        cur = current.get("kernel_ratios", {}).get(key)
        if cur is None:
            checks.append(Check("kernel_ratio", key, "not measured in this run", False, True))
            continue
        ok = cur["ratio"] <= base["max"]
        checks.append(
            Check(
                "kernel_ratio",
                key,
                f"{cur['ratio']:.4f} ({cur['fused_us']:.2f} vs {cur['reference_us']:.2f} µs) "
                f"vs baseline {base['ratio']:.4f} (max {base['max']:.4f}, "
                f"+{base['tolerance']:.1%})",
                ok,
                True,
            )
        )
    return checks


def compare_e2e(current: dict, baseline: dict, notes: list[str]) -> list[Check]:
    checks = []
    for key, base in sorted(baseline["e2e"].items()):
        cur = current.get("e2e", {}).get(key)
        if cur is None:
            checks.append(Check("tok_s", key, "not measured in this run", False, True))
            continue
        d, bd = cur["variants"]["default"], base["variants"]["default"]
        checks.append(
            Check(
                "tok_s",
                f"{key}.default",
                f"{d['median']:.1f} tok/s vs baseline {bd['median']:.1f} (min {bd['min']:.1f}, "
                f"-{bd['tolerance']:.1%})",
                d["median"] >= bd["min"],
                True,
            )
        )
        for name, bs in sorted(base["speedups"].items()):
            cs = cur["speedups"].get(name)
            where = f"{key}.speedup.{name}"
            if cs is None:
                checks.append(Check("speedup", where, "not measured in this run", False, True))
            elif not bs["gated"]:
                notes.append(f"{where}: {cs['median']:.3f}x, not gated: {bs['reason']}")
            else:
                checks.append(
                    Check(
                        "speedup",
                        where,
                        f"{cs['on']}/{cs['off']} {cs['median']:.3f}x vs baseline "
                        f"{bs['median']:.3f}x (floor {bs['floor']:.3f}x)",
                        cs["median"] >= bs["floor"],
                        True,
                    )
                )
    return checks


def faster_than_baseline(current: dict, baseline: dict) -> list[Check]:
    """Timing figures better than the baseline by more than their tolerance: a kernel ratio
    below stored x (1 - tolerance), default tok/s above stored x (1 + tolerance), a gated
    speed-up above stored + tolerance."""
    wins = []
    for key, base in sorted(baseline["kernel_ratios"].items()):
        cur = current.get("kernel_ratios", {}).get(key)
        if cur is not None and cur["ratio"] < base["ratio"] * (1 - base["tolerance"]):
            wins.append(
                Check(
                    "kernel_ratio",
                    key,
                    f"{cur['ratio']:.4f} vs baseline {base['ratio']:.4f} "
                    f"(-{base['tolerance']:.1%} is {base['ratio'] * (1 - base['tolerance']):.4f})",
                    True,
                    True,
                )
            )
    for key, base in sorted(baseline["e2e"].items()):
        cur = current.get("e2e", {}).get(key)
        if cur is None:
            continue
        d, bd = cur["variants"]["default"], base["variants"]["default"]
        if d["median"] > bd["median"] * (1 + bd["tolerance"]):
            wins.append(
                Check(
                    "tok_s",
                    f"{key}.default",
                    f"{d['median']:.1f} tok/s vs baseline {bd['median']:.1f} "
                    f"(+{bd['tolerance']:.1%})",
                    True,
                    True,
                )
            )
        for name, bs in sorted(base["speedups"].items()):
            cs = cur["speedups"].get(name)
            if cs is not None and bs["gated"] and cs["median"] > bs["median"] + bs["tolerance"]:
                wins.append(
                    Check(
                        "speedup",
                        f"{key}.speedup.{name}",
                        f"{cs['median']:.3f}x vs baseline {bs['median']:.3f}x "
                        f"(+{bs['tolerance']:.3f})",
                        True,
                        True,
                    )
                )
    return wins


def compare(current: dict, baseline: dict) -> GateResult:
    """Gate ``current`` (a run of the gate's stages) against ``baseline`` (make_baseline's).

    Raises BaselineError when the two cannot be compared.
    """
    baselines.check_comparable(current, baseline)
    notes: list[str] = []
    for field in ("torch", "triton", "cuda"):
        if current.get(field) != baseline.get(field):
            notes.append(
                f"{field} {current.get(field)} differs from the baseline's {baseline.get(field)}"
            )
    checks = [
        *compare_flags(current, baseline),
        *compare_launches(current, baseline, notes),
        *compare_numerics(current),
        *compare_kernel_ratios(current, baseline, notes),
        *compare_e2e(current, baseline, notes),
    ]
    return GateResult(checks, notes, faster_than_baseline(current, baseline))


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


def retry(
    model, plan, current: dict, baseline: dict, result: GateResult, log, ranks: Ranks
) -> GateResult:
    """Measure the failing timing checks once more; the second measurement decides."""
    failing = [c for c in result.failures if c.timing]
    if not failing:
        return result
    log(f"  re-measuring {len(failing)} failing timing check(s) once:")
    again = dict(current)
    ratio_keys = {c.key for c in failing if c.stage == "kernel_ratio"}
    if ratio_keys:
        again["kernel_ratios"] = {
            **current["kernel_ratios"],
            **measure.measure_kernel_ratios(model, plan, only=ratio_keys),
        }
    batches = sorted({int(c.key.split(".")[0][1:]) for c in failing if c.stage != "kernel_ratio"})
    if batches:
        again["e2e"] = {**current["e2e"], **measure.measure_e2e(model, plan, batches=batches)}
    again = ranks.share(again)  # rank 0's figures decide on every rank
    second = compare(again, baseline)
    by_key = {(c.stage, c.key): c for c in second.checks}
    checks = []
    for c in result.checks:
        if c in failing:
            c2 = by_key.get((c.stage, c.key), c)
            message = f"first {c.message}; again {c2.message}"
            checks.append(dataclasses.replace(c2, message=message))
            log(f"    {c.stage} {c.key}: {'PASS' if c2.ok else 'FAIL'} on the second measurement")
        else:
            checks.append(c)
    current["remeasured"] = {"kernel_ratios": again["kernel_ratios"], "e2e": again["e2e"]}
    redone = {(c.stage, c.key) for c in failing}
    wins = result.wins + [w for w in second.wins if (w.stage, w.key) in redone]
    return GateResult(
        checks, result.notes + [n for n in second.notes if n not in result.notes], wins
    )


def run_gate(
    model, baseline: dict, *, seed: int = 0, log=print, ranks: Ranks | None = None
) -> tuple[GateResult, dict]:
    """Measure ``model`` with ``baseline``'s plan, compare, re-measure failing timing once.

    Raises BaselineError when the baseline cannot be compared with this model (before
    measuring anything).
    """
    plan = measure.Plan.from_json(baseline["plan"])
    baselines.check_comparable(measure.report_header(model, plan), baseline)
    ranks = ranks or Ranks.single()
    current = measure_gate_stages(model, plan, seed=seed, log=log, ranks=ranks)
    result = compare(current, baseline)
    result = retry(model, plan, current, baseline, result, log, ranks)
    return result, current


# --------------------------------------------------------------------------------------------
# Kernel benchmarks (python -m profiling bench) against this GPU's saved pytest-benchmark run
# --------------------------------------------------------------------------------------------

# A benchmark fails when its fused / reference ratio rose past max(this, 3 x the saved run's
# spread of the fused replay, iqr / median).
KERNEL_BENCH_FLOOR = 0.05
NOT_GATED_CUBLAS = "not gated: cuBLAS path"


def kernel_bench_rows(data: dict) -> dict[str, dict]:
    """Each benchmark of a pytest-benchmark JSON: its fused / reference ratio (both timed in
    one process: the unfused ops, else the first peer), the fused call's path, and the fused
    replay's spread."""
    rows = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        us = info.get("us_per_call") or {}
        if "fused" not in us or len(us) < 2:
            continue
        reference = "unfused" if "unfused" in us else next(k for k in us if k != "fused")
        rows[b["name"]] = {
            "reference": reference,
            "ratio": us["fused"] / us[reference],
            "path": info.get("path", "triton"),
            "spread": b["stats"]["iqr"] / b["stats"]["median"],
        }
    return rows


def compare_kernel_benchmarks(saved: dict, current: dict) -> list[dict]:
    """One row per benchmark of ``current``: saved and current ratio, change, limit, verdict
    ("ok", "SLOWER", not gated where the fused call is cuBLAS's GEMM, like its peer: its time
    from process to process moves more than any planted change, or "not in the saved run")."""
    base = kernel_bench_rows(saved)
    out = []
    for name, cur in kernel_bench_rows(current).items():
        row = {"name": name, "path": cur["path"], "reference": cur["reference"]}
        row["current"] = cur["ratio"]
        if name not in base:
            out.append({**row, "verdict": "not in the saved run"})
            continue
        change = cur["ratio"] / base[name]["ratio"] - 1
        limit = max(KERNEL_BENCH_FLOOR, 3 * base[name]["spread"])
        if cur["path"] == "cublas":
            verdict = NOT_GATED_CUBLAS
        else:
            verdict = "SLOWER" if change > limit else "ok"
        out.append({**row, "saved": base[name]["ratio"], "change": change, "limit": limit,
                    "verdict": verdict})  # fmt: skip
    return out


def kernel_bench_table(rows: list[dict]) -> str:
    lines = [
        f"{'benchmark':58} {'path':7} {'saved':>7} {'now':>7} {'change':>8} {'limit':>6}  verdict",
    ]
    for r in rows:
        if "saved" not in r:
            lines.append(
                f"{r['name']:58} {r['path']:7} {'-':>7} {r['current']:7.4f}  {r['verdict']}"
            )
            continue
        lines.append(
            f"{r['name']:58} {r['path']:7} {r['saved']:7.4f} {r['current']:7.4f} "
            f"{100 * r['change']:+7.2f}% {100 * r['limit']:5.1f}%  {r['verdict']}"
        )
    return "\n".join(lines)
