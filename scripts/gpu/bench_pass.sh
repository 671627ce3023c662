#!/usr/bin/env bash
# One device call: the kernel benchmark (fused vs peers), saved by pytest-benchmark into
# perf_baselines/<gpu-slug>/ and copied flat into $OUT. Usage: OUT=out bash scripts/gpu/bench_pass.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
slug=$(python3 -c "from kernels.runtime import gpu_slug; print(gpu_slug())")
store="perf_baselines/$slug"
FUSIONGUARD_BENCH_IMPLS=fused,linear_add,addmm_ timeout 240 python3 -m pytest tests/test_kernel_bench.py \
  -m bench -q -p no:cacheprovider --benchmark-storage="file://$store" --benchmark-save=kernels \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -4 | tee "$OUT/bench_kernels.log"
FUSIONGUARD_BENCH_IMPLS=compile timeout ${COMPILE_TIMEOUT:-330} python3 -m pytest tests/test_kernel_bench.py \
  -m bench -q -p no:cacheprovider --benchmark-storage="file://$store" --benchmark-save=kernels_compile \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -4 | tee "$OUT/bench_compile.log"
find "$store" -name "*kernels*.json" -exec cp {} "$OUT/" \;
python3 scripts/kernel_bench_table.py "$OUT"/*kernels*.json | tee "$OUT/bench_table.txt"
