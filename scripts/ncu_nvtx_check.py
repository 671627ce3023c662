"""Prove with Nsight Compute that the ``o_proj_residual`` NVTX range holds exactly the kernels
of that step (DESIGN.md D4): 1 per layer fused (the Triton kernel), 2 unfused (GEMM + add).

For fused and unfused, this runs itself as a child under

    ncu --nvtx --nvtx-include "fusionguard@o_proj_residual/" \
        --metrics gpu__time_duration.sum --csv python scripts/ncu_nvtx_check.py --child ...

The child builds a small Qwen3 (default architecture, --layers layers), prefills with markers
switched off (so only decode steps carry NVTX ranges), then decodes --steps tokens eagerly.
The parent parses ncu's CSV (one row per profiled kernel) and asserts the count per layer and
step and the kernel names. Needs the ``nvtx`` package (markers are no-ops without it) and ncu.

    python scripts/ncu_nvtx_check.py --out report/ncu   # on the GPU machine, ~35 s
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NVTX_FILTER = "fusionguard@o_proj_residual/"
METRIC = "gpu__time_duration.sum"
# The fused step is one of these Triton kernels (kernels/fused_attn_output.py).
FUSED_KERNELS = ("_gemv_residual_kernel", "_gemm_residual_kernel")


def child(args) -> int:
    import torch

    import engine
    import kernels  # noqa: F401  (before engine: compiled Triton)
    from engine.config import default_config
    from engine.runner import Runner
    from profiling.markers import nvtx_available, set_markers_enabled

    if not nvtx_available():
        print("the nvtx package is missing: markers emit no NVTX ranges", file=sys.stderr)
        return 2
    model = engine.build(
        default_config().replace(num_hidden_layers=args.layers),
        seed=0,
        fuse_o_proj_residual=args.child == "fused",
    )
    runner = Runner(model, max_seq_len=args.steps + 16)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), device=model.device)
    set_markers_enabled(False)  # the prefill has o_proj_residual steps too: leave them out
    token = runner.prefill(prompt).argmax(-1)
    set_markers_enabled(True)
    for _ in range(args.steps):
        token = runner.decode(token).argmax(-1)
    torch.cuda.synchronize()
    return 0


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of ncu's --csv output (other lines, e.g. ==PROF== and the program's, skipped)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    body = [line for line in lines[start:] if line.startswith('"')]
    return list(csv.DictReader(io.StringIO("\n".join(body))))


def kernels_of(rows: list[dict]) -> list[str]:
    """One entry per profiled kernel (rows are per kernel and metric)."""
    seen: dict[str, str] = {}
    for row in rows:
        if row.get("Metric Name") == METRIC:
            seen[row["ID"]] = row["Kernel Name"]
    return [seen[k] for k in sorted(seen, key=int)]


def check(path: str, names: list[str], layers: int, steps: int) -> list[str]:
    """What is wrong with the kernels ncu found in the range (empty: all as expected)."""
    per_step = 1 if path == "fused" else 2
    expected = per_step * layers * steps
    problems = []
    if len(names) != expected:
        problems.append(
            f"{path}: {len(names)} kernels in {NVTX_FILTER}, expected {per_step} per layer x "
            f"{layers} layers x {steps} steps = {expected}"
        )
    if path == "fused":
        wrong = [n for n in names if not n.startswith(FUSED_KERNELS)]
        if wrong:
            problems.append(f"fused: kernels other than {FUSED_KERNELS}: {sorted(set(wrong))}")
    else:
        adds = [n for n in names if "add" in n.lower()]
        if len(adds) != layers * steps:
            problems.append(
                f"unfused: {len(adds)} add kernels, expected one per layer and step "
                f"({layers * steps}); kernels: {sorted(set(names))}"
            )
        if any(n.startswith(FUSED_KERNELS) for n in names):
            problems.append("unfused: the fused Triton kernel ran inside the range")
    return problems


def parent(args) -> int:
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, problems = {}, []
    for path in ("fused", "unfused"):
        cmd = [
            ncu,
            "--nvtx",
            "--nvtx-include",
            NVTX_FILTER,
            "--metrics",
            METRIC,
            "--csv",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            path,
            "--layers",
            str(args.layers),
            "--steps",
            str(args.steps),
        ]
        print("+", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        (out / f"ncu_{path}.csv").write_text(run.stdout)
        (out / f"ncu_{path}.log").write_text(run.stderr)
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
            problems.append(f"{path}: ncu exited {run.returncode}")
            continue
        names = kernels_of(parse_ncu_csv(run.stdout))
        summary[path] = {
            "kernels_in_range": len(names),
            "per_layer_per_step": len(names) / (args.layers * args.steps),
            "names": dict(collections.Counter(names)),
        }
        print(
            f"{path}: {len(names)} kernels in {NVTX_FILTER} "
            f"({len(names) / (args.layers * args.steps):g} per layer and step)"
        )
        for name, n in collections.Counter(names).items():
            print(f"    {n} x {name[:110]}")
        problems += check(path, names, args.layers, args.steps)
    summary.update(layers=args.layers, steps=args.steps, filter=NVTX_FILTER, problems=problems)
    (out / "ncu_nvtx_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    for p in problems:
        print("FAIL:", p)
    print("ncu NVTX check:", "FAIL" if problems else "PASS")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=("fused", "unfused"), help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="report/ncu", help="folder for ncu's CSV and the summary")
    args = p.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
