#!/usr/bin/env bash
# Issue 5, device call 2: launch fast path tests, host overhead, path-variant numerics, then
# tune the small-M buckets of every shape, then an engine smoke run with the new table.
# Usage: OUT=out bash scripts/gpu/issue5_pass_2.sh   (TUNE_BUCKETS to pick buckets)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n ${TAILN:-6} "$OUT/$name.log"; echo "=== $name rc=$rc"; return $rc; }
if [ -z "${SKIP_CHECKS:-}" ]; then
  step launch_tests 120 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs
  TAILN=12 step launch_overhead 60 python3 scripts/experiments/launch_overhead.py
  step variants 120 python3 -m pytest tests/test_fused_attn_output_numerics.py -q -p no:cacheprovider -k "variant or in_place or residual_weight"
fi
TAILN=0 step tune ${TUNE_TIMEOUT:-330} python3 -m kernels.tune --buckets ${TUNE_BUCKETS:-1 2 4 8 16 64}
grep -E "best|no candidate|wrote|Error" "$OUT/tune.log" | sed -E 's/KernelConfig\(path=//; s/, num_stages=1, GROUP_M=8//; s/BLOCK_//g'
cp kernels/configs/*.json "$OUT/"
if [ -z "${SKIP_SMOKE:-}" ]; then TAILN=9 step engine_smoke 120 python3 scripts/gpu_engine_smoke.py --out "$OUT"; fi
