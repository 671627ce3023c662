"""Print µs per layer, fused vs peers, from a pytest-benchmark JSON of tests/test_kernel_bench.py.

python scripts/kernel_bench_table.py perf_baselines/<gpu-slug>/<machine>/0001_kernels.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(*paths: str) -> str:
    rows = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            info = bench["extra_info"]
            rows[(info["shape"], info["M"])][info["impl"]] = info["us_per_call"]
            rows[(info["shape"], info["M"])]["floor"] = info["floor_us"]
    impls = ["floor", "fused", "linear_add", "addmm_", "compile"]
    lines = [
        f"{data['machine_info'].get('gpu', '?')}  ({data['datetime']})  µs per layer, bf16",
        "shape  M     " + "".join(f"{i:>11}" for i in impls) + "   fused vs best peer",
    ]
    for (shape, M), row in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        peers = [row[p] for p in ("addmm_", "compile", "linear_add") if p in row]
        verdict = ""
        if "fused" in row and peers:
            verdict = f"{min(peers) / row['fused']:.2f}x"
        cells = "".join(f"{row[i]:>11.2f}" if i in row else f"{'-':>11}" for i in impls)
        lines.append(f"{shape:<6} {M:<5} {cells}   {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(*sys.argv[1:]))
