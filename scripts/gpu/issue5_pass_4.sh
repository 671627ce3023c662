#!/usr/bin/env bash
# Issue 5, device call 4: keyed launch fast path (tests, host overhead), re-tune M = 8, 16, 64
# with 16-row dot tiles, engine smoke (eager and CUDA graph, fused and unfused).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n ${TAILN:-6} "$OUT/$name.log"; echo "=== $name rc=$rc"; return $rc; }
step launch_tests 150 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs
TAILN=0 step launch_overhead 60 python3 scripts/experiments/launch_overhead.py; head -10 "$OUT/launch_overhead.log"
short() { grep -E "best|no candidate|wrote|Error" "$1" | sed -E 's/KernelConfig\(path=//; s/, GROUP_M=8//; s/BLOCK_//g; s/split_k=/sk=/; s/num_warps=/w=/; s/num_stages=/s=/; s/, tma=False//'; }
TAILN=0 step tune_small 240 python3 -m kernels.tune --buckets 8 16 64; short "$OUT/tune_small.log"
cp kernels/configs/*.json "$OUT/"
TAILN=9 step engine_smoke 150 python3 scripts/gpu_engine_smoke.py --out "$OUT"
