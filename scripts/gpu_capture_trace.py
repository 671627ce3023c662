"""Capture real torch.profiler decode traces on a GPU for CPU CI (tests/data/).

A small Qwen3 (default architecture, --layers layers, random weights), batch 1: for fused and
unfused, one eager trace (--steps profiled decode steps after warm-up) and one CUDA-graph
trace (the capture plus --steps replays), gzipped. Prints the counts of each, as
profiling/launches.py reads them, and writes them beside the traces (counts.json), so a
test can compare the committed trace with what the GPU run said.

    python scripts/gpu_capture_trace.py --out tests/data     # on the GPU machine, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import kernels  # noqa: F401  (before engine: compiled or interpreted Triton)
from profiling.launches import count_launches, record_decode_trace
from profiling.throughput import git_commit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tests/data", help="folder for the traces (default tests/data)")
    p.add_argument("--layers", type=int, default=3, help="num_hidden_layers (default 3)")
    p.add_argument("--steps", type=int, default=3, help="profiled decode steps (default 3)")
    p.add_argument("--prompt-len", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: a CPU trace has no kernels to count", file=sys.stderr)
        return 2

    import engine
    from engine.config import default_config
    from engine.runner import Runner

    config = default_config().replace(num_hidden_layers=args.layers)
    model = engine.build(config, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "num_hidden_layers": args.layers,
        "steps": args.steps,
        "traces": {},
    }
    for fused in (True, False):
        model.flags.fuse_o_proj_residual = fused
        for graph in (False, True):
            name = f"decode_trace_{'graph' if graph else 'eager'}_{'fused' if fused else 'unfused'}"
            runner = Runner(model, max_seq_len=args.prompt_len + args.steps + 8, cuda_graph=graph)
            path = record_decode_trace(
                runner, args.steps, out / f"{name}.json.gz", prompt_len=args.prompt_len
            )
            counts = count_launches(path)
            summary["traces"][path.name] = counts.to_json()
            print(
                f"{path} ({path.stat().st_size / 1e3:.0f} kB): {counts.mode}, "
                f"{counts.num_steps} steps, {counts.kernels_per_step:g} kernels/step, "
                f"o_proj_residual {counts.range_instances()} per layer, "
                f"memcpy {counts.memcpy_per_step:g}, replay seen {counts.replay_kernels_seen}"
            )
    (out / "decode_trace_counts.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'decode_trace_counts.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
