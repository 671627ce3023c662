#!/usr/bin/env bash
# Issue 5, device call 1: the launch fast path on the GPU, host overhead, path-variant
# numerics, then re-tune the launch table for the new small-M design (weights before the PDL
# wait, early trigger) and the TMA GEMM path.  Usage: OUT=out bash scripts/gpu/issue5_pass_1.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n ${TAILN:-6} "$OUT/$name.log"; echo "=== $name rc=$rc"; return $rc; }
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
