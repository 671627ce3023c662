"""The one-shot all-reduce + residual kernel against NCCL all-reduce + add, µs per call in
CUDA graphs (profiling.kernel_timing.time_rank_fusion), at decode sizes, bf16. Every
rank times the same chains; rank 0 prints one line per size.

    torchrun --nproc-per-node 2 -m scripts.time_all_reduce_residual [--rows 1 8] \\
        [--hidden 1024 4096] [--rounds 11]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from engine import fusions as registry
from engine.parallel import init_distributed, world_size_from_env
from profiling.kernel_timing import REFERENCE_UNFUSED, time_rank_fusion


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: needs CUDA GPUs (one per rank, torchrun --nproc-per-node N)")
    parallel, _ = init_distributed(world_size_from_env())
    (fusion,) = [f for f in registry.rank_fusions() if f.name == "all_reduce_residual"]
    try:
        for hidden in args.hidden:
            for rows in args.rows:
                result = time_rank_fusion(
                    fusion, parallel, hidden, rows, torch.bfloat16, rounds=args.rounds
                )
                if parallel.rank != 0:
                    continue
                if result is None:
                    print(f"[{rows}, {hidden}] bf16: the one-shot kernel cannot run here")
                    continue
                fused, unfused = result.median_us("fused"), result.median_us(REFERENCE_UNFUSED)
                print(
                    f"[{rows}, {hidden}] bf16: one-shot {fused:.2f} µs, NCCL + add "
                    f"{unfused:.2f} µs, ratio {result.ratio(REFERENCE_UNFUSED):.3f}"
                )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
