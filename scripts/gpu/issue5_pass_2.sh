#!/usr/bin/env bash
# Issue 5, device call 2: launch fast path tests, host overhead, path-variant numerics, then
# tune the small-M buckets of every shape, then an engine smoke run with the new table.
# Usage: OUT=out bash scripts/gpu/issue5_pass_2.sh   (TUNE_BUCKETS to pick buckets)
source "$(dirname "$0")/common.sh"
cat "$OUT/env.txt"
if [ -z "${SKIP_CHECKS:-}" ]; then
  step launch_tests 120 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs
  TAILN=12 step launch_overhead 60 python3 scripts/experiments/launch_overhead.py
  step variants 120 python3 -m pytest tests/test_fused_attn_output_numerics.py -q -p no:cacheprovider -k "variant or in_place or residual_weight"
fi
TAILN=0 step tune ${TUNE_TIMEOUT:-330} python3 -m kernels.tune --buckets ${TUNE_BUCKETS:-1 2 4 8 16 64}
short "$OUT/tune.log"
cp kernels/configs/*.json "$OUT/"
if [ -z "${SKIP_SMOKE:-}" ]; then TAILN=9 step engine_smoke 120 python3 scripts/gpu_engine_smoke.py --out "$OUT"; fi
