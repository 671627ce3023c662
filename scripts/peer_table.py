"""Best peer / fused from saved kernel benchmarks (tests/test_kernel_bench.py's JSON):
for every fused step timed at more than one size, at the given row counts, the fused call's µs
against each peer's and its unfused ops', and the ratio best peer / fused (>= 1: the fused call
is at least as fast as the best of them).

    python -m scripts.peer_table BENCH.json [BENCH.json ...] [--rows 1 8] [--markdown]

Several files (e.g. one run on the heuristic, one with tuned tables) give one column each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_of(path: Path, wanted: set[int]) -> dict[tuple[str, str, int], dict]:
    """(fusion, size, M) -> {"fused": µs, "peers": {name: µs}, "path": ...} of one JSON."""
    data = json.loads(Path(path).read_text())
    out = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "fusion" not in info or info.get("M") not in wanted:
            continue
        us = info["us_per_call"]
        out[(info["fusion"], info["size"], info["M"])] = {
            "fused": us["fused"],
            "peers": {k: v for k, v in us.items() if k != "fused"},
            "path": info.get("path", "?"),
        }
    return out


def table(paths: list[Path], wanted: set[int]) -> list[dict]:
    per_file = [rows_of(p, wanted) for p in paths]
    sizes_of: dict[str, set[str]] = {}
    for rows in per_file:
        for fusion, size, _ in rows:
            sizes_of.setdefault(fusion, set()).add(size)
    keys = sorted(
        {k for rows in per_file for k in rows if len(sizes_of[k[0]]) > 1},
        key=lambda k: (k[0], float(k[1].rstrip("b")), k[2]),
    )
    result = []
    for key in keys:
        row = {"fusion": key[0], "size": key[1], "M": key[2], "runs": []}
        for rows in per_file:
            r = rows.get(key)
            if r is None:
                row["runs"].append(None)
                continue
            best_name = min(r["peers"], key=r["peers"].get)
            row["runs"].append(
                {
                    **r,
                    "best_peer": best_name,
                    "best_over_fused": r["peers"][best_name] / r["fused"],
                }
            )
        result.append(row)
    return result


def render(rows: list[dict], labels: list[str], markdown: bool) -> str:
    head = ["step", "size", "M"]
    for label in labels:
        head += [f"{label}: fused µs (path)", f"{label}: best peer µs", f"{label}: peer/fused"]
    lines = []
    sep = " | " if markdown else "  "
    lines.append(("| " if markdown else "") + sep.join(head) + (" |" if markdown else ""))
    if markdown:
        lines.append("|" + "---|" * len(head))
    for row in rows:
        cells = [row["fusion"], row["size"], str(row["M"])]
        for run in row["runs"]:
            if run is None:
                cells += ["-", "-", "-"]
                continue
            cells += [
                f"{run['fused']:.2f} ({run['path']})",
                f"{run['peers'][run['best_peer']]:.2f} ({run['best_peer']})",
                f"{run['best_over_fused']:.2f}",
            ]
        lines.append(("| " if markdown else "") + sep.join(cells) + (" |" if markdown else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    p.add_argument("--labels", nargs="+", default=None, help="one per file (default: its name)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    labels = args.labels or [f.stem for f in args.files]
    if len(labels) != len(args.files):
        print("error: --labels needs one label per file", file=sys.stderr)
        return 2
    try:
        rows = table(args.files, set(args.rows))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"error: not a kernel benchmark JSON ({exc})", file=sys.stderr)
        return 2
    print(render(rows, labels, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
