#!/usr/bin/env bash
# One command that measures the stack on one H100/H200 in at most 8 minutes (docs/performance.md).
#
#   benchmarks/gpu_suite.sh [--smoke] [--out DIR] [--budget SECONDS]
#
# Steps, most important first, each with its own time limit inside a global deadline (--budget, default
# 480 s); a step that would start too late is skipped, one that runs over is killed, the rest go on:
#   1. 1B full rank vs CoLA, both compiled with grouped projections (the headline ratio and MFU)
#   2. 1B CoLA (eager, one process each, so peak memory is its own): recompute none / cola-m / full
#   3. 1B pretrain_cola.py through DeepSpeed (FusedAdam, bf16, compiled, grouped) on synthetic data
#   4. 7B CoLA with CoLA-M, a few iterations
#   5. 1B full rank vs CoLA vs CoLA grouped, eager
#   6. 1B full rank vs CoLA, compiled, not grouped
# Results go to DIR (default $OUT if set, else runs/gpu_suite): each step's log and JSON, steps.tsv,
# and the summary suite.json + suite.md (also printed).
# If DeepSpeed is not importable and the wheelhouse (WHEELHOUSE, default .whl; see
# benchmarks/make_wheelhouse.sh) exists, it is installed into /tmp/site first.
# --smoke: the same steps on CPU with the debug model, 1 step each and no compilation (a test of this
# script, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=full
out=${OUT:-runs/gpu_suite}
budget=480
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) mode=smoke ;;
    --out) out=$2; shift ;;
    --budget) budget=$2; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --smoke, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
: > "$out/steps.tsv"
deadline=$(( $(date +%s) + budget ))

if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  wheels=${WHEELHOUSE:-.whl}
  if ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "> installing DeepSpeed from $wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl
    # The wheel records the accelerator of the machine that built it (cpu).
    sed -i "s/accelerator_name='cpu'/accelerator_name='cuda'/" /tmp/site/deepspeed/git_version_info_installed.py
    export PYTHONPATH=$PYTHONPATH:/tmp/site PATH=/tmp/site/bin:$PATH DS_ACCELERATOR=cuda
  else
    echo "> DeepSpeed is not importable and $wheels holds no wheel: the pretrain step will fail" >&2
  fi
fi
# The data loader's C++ helpers (a few seconds to build on a fresh machine).
if ! "$PYTHON" -c "import megatron_cola.data._helpers" 2>/dev/null; then
  "$PYTHON" setup.py build_ext --inplace >"$out/build_ext.log" 2>&1 || echo "> build_ext failed (see $out/build_ext.log)"
fi

"$PYTHON" - "$out/env.json" "$mode" <<'PY'
import json, sys, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
json.dump({"device": dev, "torch": torch.__version__, "mode": sys.argv[2]}, open(sys.argv[1], "w"))
PY

# run_step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under a time limit cut to the deadline.
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) - 10 ))
  if [ "$left" -lt 20 ]; then
    printf '%s\tskipped (deadline)\t0\n' "$name" >> "$out/steps.tsv"; echo "> $name: skipped (deadline)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "> $name (limit ${limit}s): $*"
  local t0=$(date +%s) status
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  case $? in
    0) status=ok ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed (see $name.log)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$out/steps.tsv"
  tail -n 12 "$out/$name.log"
}

if [ "$mode" = smoke ]; then
  size=debug big=debug mbs=2 big_mbs=2 seq=64 compile="" dev=cpu vocab=512
  timing=(--steps 1 --rounds 1 --warmup 1 --vocab-size 512)
  pre=(--device cpu --num-layers 2 --micro-batch-size 2 --train-iters 2 --log-interval 1 --vocab-size "$vocab")
else
  size=1B big=7B mbs=32 big_mbs=8 seq=256 compile=--compile dev=cuda vocab=32000
  timing=(--steps 5 --rounds 2 --warmup 3)
  pre=(--device cuda --micro-batch-size 16 --train-iters 20 --log-interval 5 --vocab-size "$vocab"
       --compile --grouped-projections)
fi
bench=("$PYTHON" tools/bench_train.py --device "$dev" --seq-length "$seq" "${timing[@]}")

run_step bench_compiled_grouped 170 "${bench[@]}" --model-size "$size" --micro-batch-size "$mbs" $compile \
  --variants full-rank+grouped cola+grouped --json "$out/bench_compiled_grouped.json"
for rc in none cola-m full; do
  run_step "bench_recompute_$rc" 45 "${bench[@]}" --model-size "$size" --micro-batch-size "$mbs" \
    --variants "cola:$rc" --json "$out/bench_recompute_$rc.json"
done
run_step data 30 "$PYTHON" benchmarks/suite_tools.py data "$out/data/synthetic" --vocab-size "$vocab" \
  --documents "$([ "$mode" = smoke ] && echo 200 || echo 4000)"
run_step pretrain_deepspeed 150 "$PYTHON" pretrain_cola.py --model-size "$size" --bf16 --zero-stage 1 \
  --seq-length "$seq" --data-path "$out/data/synthetic" --tokenizer-type NullTokenizer \
  --eval-interval 100000 --eval-iters 0 --tensorboard-dir "$out/pretrain_deepspeed" "${pre[@]}"
run_step bench_7b_cola_m 90 "$PYTHON" tools/bench_train.py --device "$dev" --seq-length "$seq" \
  --model-size "$big" --micro-batch-size "$big_mbs" --steps 2 --rounds 1 --warmup 1 \
  $([ "$mode" = smoke ] && echo --vocab-size 512) --variants cola:cola-m+grouped --json "$out/bench_7b_cola_m.json"
run_step bench_eager 70 "${bench[@]}" --model-size "$size" --micro-batch-size "$mbs" \
  --variants full-rank cola cola+grouped --json "$out/bench_eager.json"
run_step bench_compiled 120 "${bench[@]}" --model-size "$size" --micro-batch-size "$mbs" $compile \
  --variants full-rank cola --json "$out/bench_compiled.json"

"$PYTHON" benchmarks/suite_tools.py report "$out"
echo "> results in $out (suite.json, suite.md, one log per step)"
