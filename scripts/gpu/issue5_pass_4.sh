#!/usr/bin/env bash
# Issue 5, device call 4: keyed launch fast path (tests, host overhead), re-tune M = 8, 16, 64
# with 16-row dot tiles, engine smoke (eager and CUDA graph, fused and unfused).
source "$(dirname "$0")/common.sh"
step launch_tests 150 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs
TAILN=0 step launch_overhead 60 python3 scripts/experiments/launch_overhead.py; head -10 "$OUT/launch_overhead.log"
TAILN=0 step tune_small 240 python3 -m kernels.tune --buckets 8 16 64; short "$OUT/tune_small.log"
cp kernels/configs/*.json "$OUT/"
TAILN=9 step engine_smoke 150 python3 scripts/gpu_engine_smoke.py --out "$OUT"
