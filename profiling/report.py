"""The report's tables and plot: launches, numerics, kernel ratios, decode, the breakdown."""

from __future__ import annotations

import json
from pathlib import Path

from profiling import breakdown as breakdown_mod
from profiling.baselines import RECORD_COMMAND
from profiling.gate import expected_saving

NO_BASELINE = f"no baseline: record with {RECORD_COMMAND.split('   ')[0]}"


def _grid(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _vs(now, then, fmt: str) -> str:
    now_s = "n/a" if now is None else format(now, fmt)
    return now_s if then is None else f"{now_s} ({format(then, fmt)})"


def launches_table(report: dict, baseline: dict | None) -> str:
    """Kernels per decode step per counted variant, and per fusion what it saves."""
    base = (baseline or {}).get("launches", {})
    rows = [("variant/mode-batch", "kernels/step", "memcpy", "saved vs none (expected)")]
    launches = report.get("launches", {})
    for key, e in launches.items():
        off = launches.get(key.replace(f"{e['variant']}/", "none/", 1))
        saved = ""
        if off is not None and e["variant"] != "none":
            expected = expected_saving(report["model"], e["fusions"], off["segments"])
            saved = f"{off['kernels_per_step'] - e['kernels_per_step']:g} ({expected:g})"
        then = base.get(key, {})
        rows.append(
            (
                key,
                _vs(e["kernels_per_step"], then.get("kernels_per_step"), "g"),
                f"{e['memcpy_per_step']:g}",
                saved,
            )
        )
    fusion_rows = [("fusion", "instances/step", "fused kernels", "unfused kernels", "alternatives")]
    for name, f in report["model"]["fusions"].items():
        fusion_rows.append(
            (
                name + (" (default)" if f["default"] else ""),
                f["instances_per_step"],
                _per_instance(launches, name, on=True),
                _per_instance(launches, name, on=False, spans=f["spans"]),
                ", ".join(f["alternatives"]) or "-",
            )
        )
    return _grid(rows) + "\n\n" + _grid(fusion_rows)


def _per_instance(launches: dict, name: str, *, on: bool, spans=None) -> str:
    """Measured kernels per instance of a fusion's step, fused (where it ran) or as its ops
    ran in the all-unfused variant (graph mode, batch 1)."""
    for key, e in launches.items():
        if not key.endswith("graph-b1"):
            continue
        if on and name in e["fusions"] and name in e["segments"]:
            return f"{e['segments'][name]['per_instance']:g}"
        if not on and e["variant"] == "none":
            ops = spans[0]
            if all(op in e["segments"] for op in ops):
                return f"{sum(e['segments'][op]['per_instance'] for op in ops):g}"
    return "n/a"


def ratios_table(report: dict, baseline: dict | None) -> str:
    base = (baseline or {}).get("kernel_ratios", {})
    # A fusion against its unfused ops and peers; an op the step runs alone against a copy.
    rows = [("step/rows/reference", "path", "step µs", "reference µs", "ratio (baseline, max)")]
    for key, e in report.get("kernel_ratios", {}).items():
        b = base.get(key)
        limit = f" ({b['ratio']:.4f}, {b['max']:.4f})" if b else ""
        path = e.get("path", "-")  # runs recorded before paths were
        fused, ref = f"{e['fused_us']:.2f}", f"{e['reference_us']:.2f}"
        rows.append((key, path, fused, ref, f"{e['ratio']:.4f}{limit}"))
    return _grid(rows)


def e2e_table(report: dict, baseline: dict | None) -> str:
    out = []
    for key, e in report.get("e2e", {}).items():
        base = (baseline or {}).get("e2e", {}).get(key, {})
        rows = [(f"{key} variant", "tok/s median", "spread")]
        for name, v in e["variants"].items():
            then = base.get("variants", {}).get(name, {}).get("median")
            rows.append((name, _vs(v["median"], then, ".1f"), f"{v['spread']:.1%}"))
        out.append(_grid(rows))
        rows = [(f"{key} speed-up", "on / off", "median (baseline, floor)")]
        for name, s in e["speedups"].items():
            b = base.get("speedups", {}).get(name)
            limit = ""
            if b:
                limit = f" ({b['median']:.3f}, {b['floor']:.3f})" if b["gated"] else " (not gated)"
            rows.append((name, f"{s['on']} / {s['off']}", f"{s['median']:.3f}x{limit}"))
        out.append(_grid(rows))
    eager = report.get("eager")
    if eager:
        parts = ", ".join(f"{n} {v['median']:.1f}" for n, v in eager["variants"].items())
        out.append(f"eager decode b1 tok/s: {parts} (not gated: {eager['reason']})")
    return "\n\n".join(out)


def numerics_summary(report: dict) -> str:
    skipped = [r for r in report.get("numerics", []) if "skipped" in r]
    results = [r for r in report.get("numerics", []) if "skipped" not in r]
    failed = [r for r in results if not r["ok"]]
    lines = [f"numerics: {len(results) - len(failed)} of {len(results)} checks within the rule"]
    lines += [
        f"  FAIL {r['name']}/{r['dtype']}/m{r['rows']}: {'; '.join(r['failures'])}" for r in failed
    ]
    lines += [f"  skipped {r['name']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines)


def stage_times_summary(report: dict) -> str:
    """Per kernel that spans several steps: its stages' times (in-kernel stamps) against the
    kernel's own time (the profiler's), per decode step."""
    lines = ["Kernels that span several steps (stages from in-kernel timestamps, eager decode)"]
    for name, s in report["stage_times"].items():
        parts = " + ".join(f"{k} {v:.1f}" for k, v in s["stage_us_per_step"].items())
        lines.append(
            f"  {name} ({s['variant']}): {parts} = {sum(s['stage_us_per_step'].values()):.1f} "
            f"µs a step; the kernel {s['kernel_us_per_step']:.1f} µs "
            f"({s['stages_over_kernel']:.1%} of it in its stages)"
        )
    return "\n".join(lines)


def text(report: dict, baseline: dict | None) -> str:
    """The whole report as text, sections in the order a reader needs them."""
    sections = []
    per_rank = report.get("breakdown_per_rank") or []
    if len(per_rank) > 1:
        columns = {f"{v} r{i}": bd[v] for v in per_rank[0] for i, bd in enumerate(per_rank)}
        sections.append(
            "Where a decode step's time goes, per rank (r0, r1, ...)\n"
            + breakdown_mod.table(columns, meaningless=report.get("interpreted", False))
        )
    elif report.get("breakdown"):
        sections.append(
            "Where a decode step's time goes\n"
            + breakdown_mod.table(report["breakdown"], meaningless=report.get("interpreted", False))
        )
    if report.get("stage_times"):
        sections.append(stage_times_summary(report))
    if report.get("launches"):
        sections.append("Launches per decode step\n" + launches_table(report, baseline))
    else:
        sections.append(f"Launches: {report.get('launches_note', 'not counted')}")
    sections.append(numerics_summary(report))
    if report.get("kernel_ratios"):
        sections.append("Kernel time, fused over references\n" + ratios_table(report, baseline))
    if report.get("e2e") or report.get("eager"):
        sections.append("Decode\n" + e2e_table(report, baseline))
    return "\n\n".join(sections)


def plot(report: dict, baseline: dict | None, path: str | Path) -> Path:
    """Breakdown (stacked bars), decode tok/s per variant, kernel ratios, launches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    ax_bd, ax_e2e, ax_ratio, ax_launch = axes.flat
    bd = report.get("breakdown") or {}
    palette = plt.get_cmap("tab20")
    names: list[str] = []
    for v in bd.values():
        names += [r["name"] for r in v["rows"] if r["name"] not in names]
    labelled: set[str] = set()
    for i, variant in enumerate(bd):
        bottom = 0.0
        for r in bd[variant]["rows"]:
            if r.get("part_of"):  # a stage: already in its kernel's bar
                continue
            label = None if r["name"] in labelled else r["name"]
            labelled.add(r["name"])
            color = palette(names.index(r["name"]) % 20)
            ax_bd.bar(i, r["us_per_step"], bottom=bottom, color=color, width=0.6, label=label)
            bottom += r["us_per_step"]
    ax_bd.set_xticks(range(len(bd)), list(bd))
    source = next(iter(bd.values()))["source"] if bd else "n/a"
    ax_bd.set_title(f"µs per decode step by step ({source})", fontsize=9)
    if bd:
        ax_bd.legend(fontsize=6, ncol=2)
    e2e = report.get("e2e") or {}
    for j, (key, e) in enumerate(e2e.items()):
        vnames = list(e["variants"])
        xs = [i + 0.4 * j for i in range(len(vnames))]
        ax_e2e.bar(xs, [e["variants"][n]["median"] for n in vnames], 0.4, label=key)
        base = (baseline or {}).get("e2e", {}).get(key, {}).get("variants", {})
        pts = [(x, base[n]["median"]) for x, n in zip(xs, vnames, strict=True) if n in base]
        if pts:
            ax_e2e.scatter(*zip(*pts, strict=True), marker="_", s=300, color="black")
        ax_e2e.set_xticks(range(len(vnames)), vnames, rotation=30, fontsize=6, ha="right")
    ax_e2e.set_title("CUDA-graph decode tok/s (baseline: black)", fontsize=9)
    if e2e:
        ax_e2e.legend(fontsize=7)
    ratios = report.get("kernel_ratios") or {}
    keys = list(ratios)
    ax_ratio.bar(range(len(keys)), [ratios[k]["ratio"] for k in keys], color="tab:green")
    base = (baseline or {}).get("kernel_ratios", {})
    pts = [(i, base[k]["max"]) for i, k in enumerate(keys) if k in base]
    if pts:
        ax_ratio.scatter(*zip(*pts, strict=True), marker="_", s=300, color="red", label="gate max")
        ax_ratio.legend(fontsize=7)
    ax_ratio.set_xticks(range(len(keys)), keys, rotation=60, fontsize=5, ha="right")
    ax_ratio.set_title("kernel time step / reference (an op alone: / copy)", fontsize=9)
    launches = report.get("launches") or {}
    lkeys = list(launches)
    ax_launch.bar(range(len(lkeys)), [launches[k]["kernels_per_step"] for k in lkeys])
    ax_launch.set_xticks(range(len(lkeys)), lkeys, rotation=60, fontsize=6, ha="right")
    ax_launch.set_title("kernels per decode step", fontsize=9)
    for ax in (ax_e2e, ax_ratio, ax_launch):
        if not ax.has_data():
            ax.text(
                0.5,
                0.5,
                "not measured here (needs a CUDA GPU)",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    where = report["gpu"] + (
        " (Triton interpreter: timings mean nothing)" if report.get("interpreted") else ""
    )
    layers = report["model"]["config"]["num_hidden_layers"]
    fig.suptitle(f"fusionguard: {layers} layers, {report['model']['dtype']}, {where}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
