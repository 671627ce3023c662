#!/usr/bin/env bash
# Device call 1 of the final check-and-measure pass, at one commit:
#   record the throughput baseline, run the GPU suite (all but the 6-minute gate tests and
#   the benchmarks), the ncu NVTX check, the report, and recapture the CPU-CI traces.
# Usage (repo root, GPU runner): FUSIONGUARD_COMMIT=<sha> OUT=out bash scripts/gpu/final_pass.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then  # nvtx is not on the runner: carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
work=$OUT/final; mkdir -p "$work"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date -u +%T))"; timeout "$limit" "$@" > "$work/$name.log" 2>&1; local rc=$?; tail -n 12 "$work/$name.log"; echo "=== $name rc=$rc"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$work/env.txt" 2>&1
step record 150 python3 -m profiling record --skip-kernels
cp -r perf_baselines "$work/" 2>/dev/null
step suite 330 python3 -m pytest -m "gpu and not bench" -q -p no:cacheprovider --ignore=tests/test_gate.py -rs
step ncu 90 python3 scripts/ncu_nvtx_check.py --out "$work/ncu"
step report 90 python3 -m profiling --out "$work/report"
step traces 60 python3 scripts/gpu_capture_trace.py --out "$work/traces"
tar -C "$OUT" -czf "$OUT/final.tgz" final && rm -rf "$work"
