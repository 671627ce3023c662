#!/usr/bin/env bash
# Issue 5, final device call B (after issue5_final.sh): record decode tok/s fused vs unfused,
# eager and CUDA graph, batch 1, into perf_baselines/<gpu>/throughput.json
# (`python -m profiling record --skip-kernels`: the kernel baseline came from call A), then the
# GPU suite but the benchmarks and gate tests, in 6 processes (compiling dominates it).
# Usage: FUSIONGUARD_COMMIT=<sha> OUT=out bash scripts/gpu/issue5_final_b.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then  # nvtx is not on the runner: carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n ${TAILN:-6} "$OUT/$name.log"; echo "=== $name rc=$rc"; return $rc; }
TAILN=12 step record 200 python3 -m profiling record --skip-kernels
cp perf_baselines/*/throughput.json "$OUT/"
TAILN=8 step suite 330 python3 -m pytest -m "not bench" -q -p no:cacheprovider --ignore=tests/test_gate.py -rs -n 6 --durations=10
