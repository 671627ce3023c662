#!/usr/bin/env bash
# The raw Nsight Compute command behind scripts/ncu_nvtx_check.py: list the kernels inside the
# o_proj_residual NVTX range of a 2-layer model's 2 decode steps, fused then unfused.
# Expect 4 rows fused (_gemv_residual_kernel) and 8 unfused (a GEMM and an add per layer).
# Needs ncu and the nvtx Python package. The .py version parses the CSV and asserts the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
for path in fused unfused; do
    echo "== $path"
    ncu --nvtx --nvtx-include "fusionguard@o_proj_residual/" \
        --metrics gpu__time_duration.sum --csv \
        python3 scripts/ncu_nvtx_check.py --child "$path" --layers 2 --steps 2 |
        grep -E '^"(ID|[0-9])'
done
