#!/usr/bin/env bash
# One device call: kernel numerics on the GPU, then tune the launch table.
# Usage on the GPU runner (repo root): OUT=out bash scripts/gpu/kernel_pass.sh
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pytest tests/test_fused_attn_output_numerics.py tests/test_fused_attn_output_errors.py \
  -q -p no:cacheprovider 2>&1 | tee "$OUT/numerics_gpu.log" | tail -5
timeout 420 python3 -m kernels.tune 2>&1 | tee "$OUT/tune.log" | grep -E "best|wrote|Error|error" | tail -60
cp kernels/configs/*.json "$OUT/" 2>/dev/null
python3 -m pytest tests/test_fused_attn_output_numerics.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/numerics_gpu_tuned.log" | tail -3
