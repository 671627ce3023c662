#!/usr/bin/env bash
# Device call 2a of the final pass: launch overhead, re-record the throughput baseline at
# this commit, the whole suite but the gate tests (CPU-marked tests run on the GPU too), report.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
work=$OUT/final2; mkdir -p "$work"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$work/$name.log" 2>&1; local rc=$?; tail -n 8 "$work/$name.log"; echo "=== $name rc=$rc"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$work/env.txt" 2>&1
step launch_overhead 60 python3 scripts/experiments/launch_overhead.py
step record 150 python3 -m profiling record --skip-kernels
cp -r perf_baselines "$work/" 2>/dev/null
step suite 300 python3 -m pytest -m "not bench" -q -p no:cacheprovider --ignore=tests/test_gate.py -rs
step report 90 python3 -m profiling --out "$work/report"
tar -C "$OUT" -czf "$OUT/final2.tgz" final2 && rm -rf "$work"
