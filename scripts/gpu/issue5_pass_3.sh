#!/usr/bin/env bash
# Issue 5, device call 3: launch fast path (hooks fixed), host overhead, chain-length study,
# re-tune M = 8, 16, 64 (wider candidates) and tune M = 128, 512, 2048 (pointer and TMA GEMM).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n ${TAILN:-6} "$OUT/$name.log"; echo "=== $name rc=$rc"; return $rc; }
step launch_tests 120 python3 -m pytest tests/test_triton_launch.py -q -p no:cacheprovider -rs
TAILN=10 step launch_overhead 60 python3 scripts/experiments/launch_overhead.py
TAILN=20 step chain_length 90 python3 scripts/experiments/chain_length.py
short() { grep -E "best|no candidate|wrote|Error" "$1" | sed -E 's/KernelConfig\(path=//; s/, GROUP_M=8//; s/BLOCK_//g; s/split_k=/sk=/; s/num_warps=/w=/; s/num_stages=/s=/'; }
TAILN=0 step tune_small 210 python3 -m kernels.tune --buckets 8 16 64; short "$OUT/tune_small.log"
TAILN=0 step tune_large 250 python3 -m kernels.tune --buckets 128 512 2048; short "$OUT/tune_large.log"
cp kernels/configs/*.json "$OUT/"
