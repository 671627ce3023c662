#!/usr/bin/env bash
# Issue 5, final device call B (after issue5_final_a.sh): record decode tok/s fused vs unfused,
# eager and CUDA graph, batch 1, into perf_baselines/<gpu>/throughput.json
# (`python -m profiling record --skip-kernels`: the kernel baseline came from call A), then the
# GPU suite but the benchmarks and gate tests, in 6 processes (compiling dominates it).
# Usage: FUSIONGUARD_COMMIT=<sha> OUT=out bash scripts/gpu/issue5_final_b.sh
source "$(dirname "$0")/common.sh"
TAILN=12 step record 200 python3 -m profiling record --skip-kernels
cp perf_baselines/*/throughput.json "$OUT/"
TAILN=8 step suite 330 python3 -m pytest -m "not bench" -q -p no:cacheprovider --ignore=tests/test_gate.py -rs -n 6 --durations=10
