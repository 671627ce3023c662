#!/usr/bin/env bash
# Issue 5, final device call A at one commit: the GPU suite (all but the benchmarks and the
# 6-minute gate tests), then the kernel benchmark (fused vs F.linear+add, addmm_,
# torch.compile at M 1..2048 for four Qwen3 shapes) saved by pytest-benchmark as this GPU's
# new kernel baseline. Call B (issue5_final_b.sh) records decode tok/s and runs the gate tests.
# Usage: FUSIONGUARD_COMMIT=<sha> OUT=out bash scripts/gpu/issue5_final_a.sh
source "$(dirname "$0")/common.sh"
step suite 200 python3 -m pytest -m "not bench" -q -p no:cacheprovider --ignore=tests/test_gate.py -rs
slug=$(python3 -c "from kernels.runtime import gpu_slug; print(gpu_slug())")
TAILN=4 step bench 400 python3 -m pytest tests/test_kernel_bench.py -m bench -q -p no:cacheprovider \
  --benchmark-storage="file://$PWD/perf_baselines/$slug" --benchmark-save=baseline \
  --benchmark-columns=median,iqr,rounds
newest=$(ls perf_baselines/$slug/*/0*_baseline.json | sort | tail -n 1)
python3 scripts/kernel_bench_table.py "$newest" | tee "$OUT/bench_table.txt"
tar -czf "$OUT/perf_baselines.tgz" perf_baselines kernels/configs
