"""Experiment: does the µs-per-call figure of a PDL kernel depend on the chain length (reps
passes over the 28 layers in one CUDA graph)? The tuner's first pass uses reps=2, its re-time
reps=4, the benchmark reps=16. M=1 and M=8, Qwen3-0.6B o_proj shape, a few configurations,
each timed at every length twice, interleaved."""

from __future__ import annotations

import dataclasses
import statistics

from kernels.fused_attn_output import KernelConfig, select_config, use_config
from profiling.kernel_timing import ChainInputs, GraphChain, addmm_step, fused_step

CONFIGS = {
    1: {
        "bn8-w4": KernelConfig("gemv", 1, 8, 2048, 4, 1, pdl=True),
        "bn2-w4": KernelConfig("gemv", 1, 2, 2048, 4, 1, pdl=True),
        "bn2-w8": KernelConfig("gemv", 1, 2, 2048, 8, 1, pdl=True),
        "bn4-w4": KernelConfig("gemv", 1, 4, 2048, 4, 1, pdl=True),
    },
    8: {},
}


def main():
    for M, configs in CONFIGS.items():
        inputs = ChainInputs.draw(M, 1024, 2048)
        tuned = select_config(M, 1024, 2048, inputs.xs[0].dtype)
        configs = {"tuned": tuned, **configs, "tuned-nopdl": dataclasses.replace(tuned, pdl=False)}
        rows = {name: {} for name in [*configs, "addmm_"]}
        for _attempt in range(2):
            for reps in (2, 4, 16):
                for name, cfg in configs.items():
                    with use_config(cfg):
                        us = statistics.median(GraphChain(fused_step, inputs, reps).us_per_call(11))
                    rows[name].setdefault(reps, []).append(us)
                us = statistics.median(GraphChain(addmm_step, inputs, reps).us_per_call(11))
                rows["addmm_"].setdefault(reps, []).append(us)
        print(f"M={M} µs per call (two attempts) by reps; tuned = {tuned}")
        for name, by_reps in rows.items():
            cells = "  ".join(
                f"r{k}: " + "/".join(f"{v:.2f}" for v in vs) for k, vs in by_reps.items()
            )
            print(f"  {name:<12} {cells}")


if __name__ == "__main__":
    main()
