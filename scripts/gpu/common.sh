# Sourced by the issue-5 device-call scripts: output folder, environment, the carried nvtx
# wheel, env.txt (date, GPU, versions, commit) and step NAME LIMIT CMD..., which runs CMD
# with a time limit into $OUT/NAME.log and prints its last $TAILN lines (default 6).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then  # nvtx is not on the runner: carried as a wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; } > "$OUT/env.txt" 2>&1
step() {
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n "${TAILN:-6}" "$OUT/$name.log"; echo "=== $name rc=$rc"; return $rc
}
# The tuner's "best" lines, shortened.
short() {
  grep -E "best|no candidate|wrote|Error" "$1" | sed -E 's/KernelConfig\(path=//; s/, GROUP_M=8//;
    s/BLOCK_//g; s/split_k=/sk=/; s/num_warps=/w=/; s/num_stages=/s=/; s/, tma=False//'
}
