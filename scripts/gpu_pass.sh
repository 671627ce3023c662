#!/usr/bin/env bash
# A pass of steps on a GPU runner: run the named steps in order, each under its own time limit.
# Every step's log and outputs go under $OUT/pass/ ($OUT: the output folder, default ./out),
# and the whole folder is packed into one archive, $OUT/pass.tar.gz, after every step: one
# file carries the whole pass off the machine, and a pass cut short keeps what it finished.
# Afterwards, `python -m scripts.runs add <the unpacked pass/> --command "..."` appends the
# pass's figures to results/runs.jsonl.
#
#   OUT=out FUSIONGUARD_COMMIT=<sha> bash scripts/gpu_pass.sh env check:120 record:200 proof:400
#
# Steps (NAME or NAME:SECONDS, default 300 s):
#   env      GPU, driver, versions, commit          check    kernel numerics, quick (-x)
#   tptests  the tensor-parallel tests (NCCL ones need 2 GPUs)
#   suite    tox -e gpu's three commands            record   profiling record --force --processes 3
#   gate     python -m profiling gate               proof    planted regressions (scripts.gate_proof;
#                                                            PROOF_ARGS: e.g. "--plants" for none)
#   ncu      scripts.ncu_nvtx_check                 report   python -m profiling (report folder)
#   traces   scripts.capture_traces                 tune     python -m profiling.tune (TUNE_ARGS:
#                                                            e.g. "--fusions down_proj_residual
#                                                            --sizes 0.6b 8b; --buckets 8"),
#                                                            into the tree and configs/
#   benchjson  the kernel benchmark, JSON kept      onboard  python -m profiling onboard (tables
#              (BENCH_K: -k filter)                          and baselines come back too)
#   bench    python -m profiling bench --save       ab       scripts.compare_trees $AB_BASE . (decode
#                                                            tok/s of two trees, runs alternating)
#   abproof  scripts.ab_proof per AB_PROOF entry     abbisect scripts.ab_proof --bisect
#            ("none:10 attention_3pct:5"; AB_PAIRS)           (BISECT_PLANT; AB_PAIRS)
#   tp       (>= 2 GPUs) torchrun --nproc-per-node 2 -m profiling measure --size 8b, then the
#            same on one GPU: decode tok/s of TP=2 and TP=1 from one pass (tp-8b.txt)
#   tpgate   (>= 2 GPUs) torchrun -m profiling record --force, then gate, on 2 ranks
#            (perf_baselines/<gpu-slug>/tp2/; TP_SIZE=0.6b by default)
#   tpproof  (>= 2 GPUs) scripts.gate_proof --tp 2 on GPUs 0 1: the 4 TP plants and 3 unchanged
#            runs, one torchrun gate (~75 s at 0.6B) after another, ~9 min: give it its own
#            call (tpproof:590) after a tp2 baseline exists (tpgate, or committed); the full
#            10-run proof (~18 min) takes two calls, e.g. PROOF_ARGS="--runs 7 --plants"
set -uo pipefail
OUT=${OUT:-out}
STAGE="$OUT/pass"
mkdir -p "$STAGE"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MPLBACKEND=Agg
# NVLink multicast stays off (GPUs may be shared with other jobs): never let a library turn it on.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels shipped with the tree, for a runner offline
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
# This GPU's baselines folder (perf_baselines/<gpu-slug>/): other GPUs' baselines stay put.
SLUG=$(python3 -c "import kernels.runtime as r; print(r.gpu_slug())" 2>/dev/null || echo unknown)
BASE="perf_baselines/$SLUG"
pack() { tar -czf "$OUT/pass.tar.gz" -C "$OUT" pass; }
step() {  # step NAME LIMIT CMD...: run CMD into $STAGE/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$STAGE/$name.log" 2>&1; local rc=$?
  tail -n "${TAILN:-8}" "$STAGE/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"
  pack
  return $rc
}
for spec in "$@"; do
  name=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
  case $name in
    env) step env "$limit" bash -c 'date -u; nvidia-smi; python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)"; echo "commit ${FUSIONGUARD_COMMIT:-unknown}"; python3 -m pip list 2>/dev/null | grep -iE "^(nvtx|pytest|transformers) "' ;;
    check) step check "$limit" python3 -m pytest -x -q -p no:cacheprovider -m "not bench and not timing" \
        tests/test_linear_residual_numerics.py tests/test_rms_norm_linear_numerics.py \
        tests/test_rms_norm_swiglu_numerics.py tests/test_qk_norm_rope_numerics.py \
        tests/test_decode_attention_numerics.py \
        tests/test_registry.py ;;
    tptests) TAILN=15 step tptests "$limit" python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_tensor_parallel.py tests/test_profiling_tp.py ;;
    # tox -e gpu's three commands; each runs even when one before it fails (a pass gathers all
    # it can), each prints its time; rc: the worst.
    suite) TAILN=25 step suite "$limit" bash -c 'rc=0; for cmd in "pytest -q -p no:cacheprovider -m \"not bench and not timing\" -n auto -rs" "pytest -q -p no:cacheprovider -m timing -rs" "profiling gate"; do t=$SECONDS; eval python3 -m $cmd; r=$?; echo "--- python -m $cmd: rc=$r in $((SECONDS - t)) s"; [ $r -gt $rc ] && rc=$r; done; exit $rc' ;;
    record) TAILN=40 step record "$limit" python3 -m profiling record --force --processes 3
            cp "$BASE/baseline.json" "$STAGE/" 2>/dev/null; pack ;;
    gate) TAILN=20 step gate "$limit" python3 -m profiling gate --out "$STAGE/gate" ;;
    proof) TAILN=25 step proof "$limit" python3 -m scripts.gate_proof --out "$STAGE/proof" \
        --gpus $(seq 0 $((GPUS - 1))) ${PROOF_ARGS:-} ;;
    ncu) TAILN=20 step ncu "$limit" python3 -m scripts.ncu_nvtx_check --out "$STAGE/ncu" ;;
    report) TAILN=80 step report "$limit" python3 -m profiling --out "$STAGE/report" ;;
    traces) step traces "$limit" python3 -m scripts.capture_traces --out "$STAGE/traces" ;;
    # Tables go into the tree (later steps of the pass run with them) and come back under
    # configs/ (copy them into kernels/configs/); TUNE_ARGS may hold several runs, ";" between.
    tune) TAILN=30 step tune "$limit" bash -c 'IFS=";" read -ra runs <<< "${TUNE_ARGS:-}"
          for args in "${runs[@]:-}"; do python3 -m profiling.tune $args || exit; done'
          cp -r kernels/configs "$STAGE/"; pack ;;
    # AB_BASE: the trees (e.g. exported commits) to time this one against, one per ab step
    # in order (the last one for any further ab step).
    ab) ab=$((${ab:-0} + 1)); read -ra bases <<< "${AB_BASE:?AB_BASE: the trees to compare with}"
        base=${bases[$((ab - 1))]:-${bases[-1]}}
        TAILN=12 step "ab$ab" "$limit" python3 -m scripts.compare_trees "$base" . \
        --runs "${AB_RUNS:-2}" --out "$STAGE/ab$ab.json" ;;
    # The kernel benchmark without saving or comparing (BENCH_K: a -k filter), JSON kept.
    benchjson) bj=$((${bj:-0} + 1))
        TAILN=12 step "benchjson$bj" "$limit" python3 -m pytest -m bench -p no:cacheprovider -q \
        ${BENCH_K:+-k "$BENCH_K"} --benchmark-json="$STAGE/bench$bj.json" ;;
    # The same benchmark in a copy of the tree without this GPU's tuned tables: the heuristic.
    benchheur) TAILN=12 step benchheur "$limit" bash -c 'rm -rf /tmp/heur && python3 -c "
from pathlib import Path; import scripts.gate_proof as g; g.copy_tree(Path(\"/tmp/heur\"))" &&
        rm -f /tmp/heur/kernels/configs/*/"$1".json && cp -r results /tmp/heur/ && cd /tmp/heur &&
        python3 -m pytest -m bench -p no:cacheprovider -q ${BENCH_K:+-k "$BENCH_K"} \
        --benchmark-json="$0/bench-heuristic.json"' "$STAGE" "$SLUG" ;;
    # A slowdown planted in the linear+residual kernel (PLANT_FMAS dependent FMAs per program)
    # of a copy of the tree: the kernel benchmark compared with this GPU's saved run must fail.
    benchplant) TAILN=30 step benchplant "$limit" bash -c 'rm -rf /tmp/plant && python3 -c "
from pathlib import Path; import scripts.gate_proof as g; t = Path(\"/tmp/plant\"); g.copy_tree(t)
p, apply = g._fma_plant(int(\"$1\")); f = t / p; f.write_text(apply(f.read_text()))" &&
        cp -r results /tmp/plant/ && cd /tmp/plant && python3 -m profiling bench -k "$2"' \
        benchplant "${PLANT_FMAS:-55}" "${PLANT_K:-o_proj_residual-0.6b}" ;;
    # The kernel benchmark compared with this GPU's saved run (PLANT_K: the -k filter).
    benchcmp) TAILN=30 step benchcmp "$limit" python3 -m profiling bench -k "${PLANT_K:-o_proj_residual-0.6b}" ;;
    # The engine CLI's decode figure next to profiling measure's, same GPU, same settings.
    cli) TAILN=30 step cli "$limit" bash -c 'python3 -m engine --cuda-graph --prompt-len 16 \
        --max-new-tokens 48 && python3 -m profiling measure --batches 1 --out "$0/measure-b1"' \
        "$STAGE" ;;
    onboard) TAILN=40 step onboard "$limit" python3 -m profiling onboard
        cp -r kernels/configs "$STAGE/"; cp -r "$BASE" "$STAGE/baselines"; pack ;;
    bench) TAILN=20 step bench "$limit" python3 -m profiling bench --save
           # the saved pytest-benchmark JSON (per-call times, paths, peers) comes back too
           mkdir -p "$STAGE/bench" && cp -r "$BASE"/*-CPython-* "$STAGE/bench/" 2>/dev/null
           pack ;;
    tp|tpgate|tpproof) if [ "$GPUS" -lt 2 ]; then echo "=== $name: needs 2 GPUs, $GPUS here"; continue; fi ;;&
    tp) TAILN=40 step tp "$limit" bash -c '
          # Short plan: one batch size, 5 rounds; at 8B the whole-model fp32 check is skipped
          # (it says why) and the per-fusion numerics run. Each run has its share of the step
          # (TP_SPLIT seconds for TP=2), so that a slow TP=2 run still leaves TP=1 its turn.
          plan="--size 8b --batches 1 --rounds 5 --seed 0"
          timeout "${TP_SPLIT:-240}" torchrun --standalone --nproc-per-node 2 -m profiling \
            measure $plan --out "$0/tp2-8b"
          CUDA_VISIBLE_DEVICES=0 python3 -m profiling measure $plan --out "$0/tp1-8b"
          python3 -m scripts.tp_compare "$0/tp1-8b" "$0/tp2-8b" | tee "$0/tp-8b.txt"' "$STAGE" ;;
    tpgate) TAILN=40 step tpgate "$limit" bash -c '
          set -e
          torchrun --standalone --nproc-per-node 2 -m profiling record --force --size "${TP_SIZE:-0.6b}" --processes 3
          cp "$1/tp2/baseline.json" "$0/tp2-baseline.json"
          torchrun --standalone --nproc-per-node 2 -m profiling gate --out "$0/tpgate"' "$STAGE" "$BASE" ;;
    tpproof) cp "$BASE/tp2/baseline.json" "$STAGE/tpproof-baseline.json" 2>/dev/null
        # --runs before PROOF_ARGS: a later --runs there wins (argparse keeps the last).
        TAILN=25 step tpproof "$limit" python3 -m scripts.gate_proof --tp 2 --out "$STAGE/tpproof" \
        --gpus 0 1 --runs 3 ${PROOF_ARGS:-} ;;
    # The A/B proved (scripts.ab_proof): AB_PROOF "PLANT:RUNS ..." (default: one A/A), each
    # run an `ab --base HEAD` of a clone of HEAD with PLANT uncommitted (AB_PAIRS: --pairs).
    abproof) read -ra plants <<< "${AB_PROOF:-none:1}"
        TAILN=30 step abproof "$limit" bash -c 'rc=0; for pr in "$@"; do
          python3 -m scripts.ab_proof --plant "${pr%%:*}" --runs "${pr#*:}" \
            --out "'"$STAGE"'/abproof-${pr%%:*}" ${AB_PAIRS:+--pairs "$AB_PAIRS"} || rc=$?
        done; exit $rc' _ "${plants[@]}" ;;
    # bisect over 7 commits with one planted (BISECT_PLANT, default attention_3pct).
    abbisect) TAILN=30 step abbisect "$limit" python3 -m scripts.ab_proof \
        --bisect "${BISECT_PLANT:-attention_3pct}" --out "$STAGE/abbisect" \
        ${AB_PAIRS:+--pairs "$AB_PAIRS"} ;;
    *) echo "unknown step $name"; exit 2 ;;
  esac
done
