"""Capture real torch.profiler decode traces on a GPU for CPU CI (tests/data/).

A small Qwen3 (default architecture, --layers layers, random weights), batch 1, for the
engine's default fusions and for every step unfused: one eager trace (--steps profiled decode
steps after warm-up) and one CUDA-graph trace (the capture plus --steps replays), gzipped.
tests/data/decode_traces.json says what each trace holds (variant, fusions, mode, layers,
steps, GPU, commit); CPU tests count the traces and derive what they must find from the
config and the fusion registry, not from this run's counts.

    python -m scripts.capture_traces --out tests/data     # on a GPU machine, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


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
    from engine.flags import FusionFlags
    from engine.runner import Runner
    from profiling.launches import count_launches, record_decode_trace
    from profiling.measure import git_commit, segment_names

    model = engine.build(default_config().replace(num_hidden_layers=args.layers), seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "num_hidden_layers": args.layers,
        "steps": args.steps,
        "prompt_len": args.prompt_len,
        "traces": {},
    }
    for variant, flags in (("default", FusionFlags.default()), ("none", FusionFlags.none())):
        model.flags = flags
        for graph in (False, True):
            mode = "graph" if graph else "eager"
            runner = Runner(model, max_seq_len=args.prompt_len + args.steps + 8, cuda_graph=graph)
            path = record_decode_trace(
                runner,
                args.steps,
                out / f"decode_trace_{mode}_{variant}.json.gz",
                prompt_len=args.prompt_len,
            )
            counts = count_launches(path, ranges=segment_names(model))
            index["traces"][path.name] = {
                "variant": variant,
                "fusions": sorted(flags.enabled),
                "mode": mode,
            }
            print(
                f"{path} ({path.stat().st_size / 1e3:.0f} kB): {counts.mode}, "
                f"{counts.num_steps} steps, {counts.kernels_per_step:g} kernels/step, "
                f"memcpy {counts.memcpy_per_step:g}, replay seen {counts.replay_kernels_seen}"
            )
    (out / "decode_traces.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {out / 'decode_traces.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
