"""The fused-vs-unfused report: a table against the stored baseline, a JSON and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from profiling.baselines import RECORD_COMMAND

NO_BASELINE = f"no baseline: record with {RECORD_COMMAND.split('   ')[0]}"


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _vs(now, then, fmt: str) -> str:
    """``now (then)``, or ``now`` when there is no stored value."""
    if then is None:
        return _num(now, fmt)
    return f"{_num(now, fmt)} ({_num(then, fmt)})"


def table(report: dict, baseline: dict | None) -> str:
    """Rows per mode and path: launches per token (total, o_proj_residual step), tok/s median
    with its spread, speed-up; baseline values in parentheses."""
    header = (
        "mode",
        "path",
        "launches/token",
        "o_proj_residual/token",
        "per layer",
        "tok/s median",
        "spread",
        "speed-up",
    )
    rows = [header]
    for key, entry in report["modes"].items():
        base = (baseline or {}).get("modes", {}).get(key, {})
        for path in ("fused", "unfused"):
            if path not in entry:
                continue
            now, then = entry[path], base.get(path, {})
            speedup = entry.get("speedup") if path == "fused" else None
            base_speedup = base.get("speedup") if path == "fused" else None
            rows.append(
                (
                    key,
                    path,
                    _vs(now.get("launches_per_token"), then.get("launches_per_token"), "g"),
                    _vs(
                        now.get("o_proj_residual_per_token"),
                        then.get("o_proj_residual_per_token"),
                        "g",
                    ),
                    _num(now.get("o_proj_residual_per_layer"), "g"),
                    _vs(now["tok_s_median"], then.get("tok_s_median"), ".1f"),
                    f"{now['spread_rel']:.1%}",
                    _vs(speedup, base_speedup, ".3f") if path == "fused" else "",
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(report: dict, baseline: dict | None, path: str | Path) -> Path:
    """tok/s per mode (fused vs unfused, baseline as markers) and launches per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["modes"])
    fig, (ax_rate, ax_launch) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, path_name, color in (
        (-width / 2, "fused", "tab:green"),
        (width / 2, "unfused", "tab:gray"),
    ):
        xs = [i + offset for i in range(len(keys))]
        rates = [report["modes"][k].get(path_name, {}).get("tok_s_median", 0) for k in keys]
        ax_rate.bar(xs, rates, width, label=path_name, color=color)
        launches = [
            report["modes"][k].get(path_name, {}).get("launches_per_token") or 0 for k in keys
        ]
        ax_launch.bar(xs, launches, width, label=path_name, color=color)
        if baseline:
            base = [
                baseline["modes"].get(k, {}).get(path_name, {}).get("tok_s_median") for k in keys
            ]
            pts = [(x, b) for x, b in zip(xs, base, strict=True) if b is not None]
            if pts:
                ax_rate.scatter(
                    *zip(*pts, strict=True),
                    marker="_",
                    s=400,
                    color="black",
                    label=f"baseline {path_name}" if path_name == "fused" else None,
                )
    if not any(
        report["modes"][k].get(p, {}).get("launches_per_token")
        for k in keys
        for p in ("fused", "unfused")
    ):
        ax_launch.text(
            0.5,
            0.5,
            "not counted: launch counts need a CUDA GPU",
            ha="center",
            va="center",
            transform=ax_launch.transAxes,
        )
    for ax, title in ((ax_rate, "decode tok/s (median)"), (ax_launch, "kernels per token")):
        ax.set_xticks(range(len(keys)), keys)
        ax.set_title(title)
        ax.legend(fontsize=8)
    where = report["gpu"] + (
        " (Triton interpreter: timings mean nothing)" if report.get("interpreted") else ""
    )
    fig.suptitle(
        f"fused vs unfused o_proj+residual, {report['config'].get('num_hidden_layers')}"
        f" layers, {where}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
