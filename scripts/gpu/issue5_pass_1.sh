#!/usr/bin/env bash
# Issue 5, device call 1: the launch fast path on the GPU, host overhead, path-variant
# numerics, then re-tune the launch table for the new small-M design (weights before the PDL
# wait, early trigger) and the TMA GEMM path.  Usage: OUT=out bash scripts/gpu/issue5_pass_1.sh
source "$(dirname "$0")/common.sh"
cat "$OUT/env.txt"
if ! step launch_tests 120 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs; then
  echo "!!! fast launch path failed on this GPU: tuning through Triton's own path"
  export FUSIONGUARD_TRITON_LAUNCH=jit
fi
step launch_overhead 60 python3 scripts/experiments/launch_overhead.py
step variants 120 python3 -m pytest tests/test_fused_attn_output_numerics.py -q -p no:cacheprovider -k "variant or in_place or residual_weight" -x
TAILN=45 step tune ${TUNE_TIMEOUT:-400} python3 -m kernels.tune
cp kernels/configs/*.json "$OUT/"
grep -E "best|wrote|skip" "$OUT/tune.log" | grep -c skip | sed 's/^/skipped candidates: /'
TAILN=14 step engine_smoke 120 python3 scripts/gpu_engine_smoke.py --out "$OUT"
