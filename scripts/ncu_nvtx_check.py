"""Prove with Nsight Compute that each fusion's NVTX range holds exactly that step's kernels:
``ncu --nvtx --nvtx-include "fusionguard@<fusion>/"`` lists one fused kernel per instance.

For every registered fusion, this runs itself as a child under

    ncu --nvtx --nvtx-include "fusionguard@<fusion>/" --metrics gpu__time_duration.sum --csv \
        python -m scripts.ncu_nvtx_check --child <fusion> ...

The child builds a small Qwen3 (default architecture, --layers layers) with the fusion on (the
engine's default fusions, or for an alternative the default without its alternatives), prefills
with markers off (so only decode steps carry NVTX ranges), then decodes --steps tokens eagerly.
The parent parses ncu's CSV (one row per profiled kernel and metric) and checks the count
(instances per step x fused kernels x steps) and the kernel names (the fusion's declared
kernel_names). Needs the ``nvtx`` package (markers are no-ops without it) and ncu.

    python -m scripts.ncu_nvtx_check --out report/ncu     # on a GPU machine, ~1-2 min
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

METRIC = "gpu__time_duration.sum"


def _variant(fusion_name: str):
    from profiling.throughput import variants_and_pairings

    variants, pairings = variants_and_pairings()
    on = next(p.on for p in pairings if p.name == fusion_name)
    return next(v for v in variants if v.name == on)


def child(args) -> int:
    import torch

    import engine
    from engine.config import default_config
    from engine.runner import Runner
    from kernels.markers import nvtx_available, set_markers_enabled

    if not nvtx_available():
        print("the nvtx package is missing: markers emit no NVTX ranges", file=sys.stderr)
        return 2
    model = engine.build(
        default_config().replace(num_hidden_layers=args.layers),
        seed=0,
        flags=_variant(args.child).flags(),
    )
    runner = Runner(model, max_seq_len=args.steps + 16)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), device=model.device)
    set_markers_enabled(False)  # the prefill has the same steps: leave them out
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


def check(fusion, names: list[str], instances: int, steps: int) -> list[str]:
    """What is wrong with the kernels ncu found in the fusion's range (empty: as declared)."""
    expected = fusion.fused_kernels * instances * steps
    problems = []
    if len(names) != expected:
        problems.append(
            f"{fusion.name}: {len(names)} kernels in its range, expected {fusion.fused_kernels} "
            f"per instance x {instances} instances x {steps} steps = {expected}"
        )
    wrong = sorted({n for n in names if not n.startswith(fusion.kernel_names)})
    if wrong:
        problems.append(f"{fusion.name}: kernels other than {fusion.kernel_names}: {wrong}")
    return problems


def parent(args) -> int:
    import torch

    from engine import fusions as registry
    from engine.config import default_config
    from engine.program import span_instances
    from engine.qwen3 import Qwen3ForCausalLM

    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu (Nsight Compute) is not on PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # the program's structure only: no weights
        program = Qwen3ForCausalLM(
            default_config().replace(num_hidden_layers=args.layers)
        ).program()
    summary, problems = {}, []
    for fusion in registry.all_fusions():
        nvtx_filter = f"fusionguard@{fusion.name}/"
        cmd = [
            ncu, "--nvtx", "--nvtx-include", nvtx_filter, "--metrics", METRIC, "--csv",
            sys.executable, "-m", "scripts.ncu_nvtx_check", "--child", fusion.name,
            "--layers", str(args.layers), "--steps", str(args.steps),
        ]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        (out / f"ncu_{fusion.name}.csv").write_text(run.stdout)
        (out / f"ncu_{fusion.name}.log").write_text(run.stderr)
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
            problems.append(f"{fusion.name}: ncu exited {run.returncode}")
            continue
        names = kernels_of(parse_ncu_csv(run.stdout))
        instances = len(span_instances(program, fusion))
        summary[fusion.name] = {
            "filter": nvtx_filter,
            "kernels_in_range": len(names),
            "per_instance_per_step": len(names) / (instances * args.steps),
            "names": dict(collections.Counter(names)),
        }
        print(f"{fusion.name}: {len(names)} kernels in {nvtx_filter}")
        for name, n in collections.Counter(names).items():
            print(f"    {n} x {name[:110]}")
        problems += check(fusion, names, instances, args.steps)
    summary.update(layers=args.layers, steps=args.steps, problems=problems)
    (out / "ncu_nvtx_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    for p in problems:
        print("FAIL:", p)
    print("ncu NVTX check:", "FAIL" if problems else "PASS")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="report/ncu", help="folder for ncu's CSV and the summary")
    args = p.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
