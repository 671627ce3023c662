#!/usr/bin/env bash
# Issue 5, device call 3: launch fast path (hooks fixed), host overhead, chain-length study,
# re-tune M = 8, 16, 64 (wider candidates) and tune M = 128, 512, 2048 (pointer and TMA GEMM).
source "$(dirname "$0")/common.sh"
step launch_tests 120 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs
TAILN=10 step launch_overhead 60 python3 scripts/experiments/launch_overhead.py
TAILN=20 step chain_length 90 python3 scripts/experiments/chain_length.py
TAILN=0 step tune_small 210 python3 -m kernels.tune --buckets 8 16 64; short "$OUT/tune_small.log"
TAILN=0 step tune_large 250 python3 -m kernels.tune --buckets 128 512 2048; short "$OUT/tune_large.log"
cp kernels/configs/*.json "$OUT/"
