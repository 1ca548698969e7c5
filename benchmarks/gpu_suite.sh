#!/usr/bin/env bash
# One command that measures the stack on one H100/H200 inside a global deadline (docs/performance.md).
#
#   benchmarks/gpu_suite.sh [--smoke] [--out DIR] [--budget SECONDS] [--wheelhouse DIR] [--target DIR]
#                           [--modes LIST] [--only STEPS]
#
# Steps, most important first. Each measured variant runs in its own process (its peak memory is its
# own); each step gets a time limit cut to the time left before the deadline (--budget, default 450 s);
# a step is not started when too little time is left, and the table of what finished is printed anyway.
#   headline_full_rank   1B full rank (fused qkv / gate-up), seq 256, bf16, compiled
#   headline_cola        1B CoLA (grouped A projections), the same          -> CoLA / full-rank tokens/s
#   cola_m               1B CoLA with CoLA-M recomputation, the same        -> its peak memory vs CoLA's
#   data                 synthetic Megatron-format data for the next step (no network on the GPU machine)
#   pretrain_deepspeed   1B CoLA through pretrain_cola.py: DeepSpeed ZeRO-1, FusedAdam, bf16, compiled
#   cola_mode_MODE       headline_cola again under each --compile-mode in --modes (comma-separated;
#                        default reduce-overhead,max-autotune-no-cudagraphs; "none" for no such step)
# Before the steps: the wheelhouse (--wheelhouse, default .whl: benchmarks/make_wheelhouse.sh) is installed
# into --target (default /tmp/site; it must be empty or a target of an earlier suite run), the C++ data
# helpers are built, and DeepSpeed's FusedAdam is JIT-built in the background (stale torch_extensions
# locks of a killed build are removed first); the DeepSpeed step waits for that build.
# Results go to DIR (default runs/gpu_suite), which must be empty or an earlier suite's output (then it is
# emptied): each step's log and JSON, steps.tsv, and suite.json + suite.md (printed). When $OUT is set
# (the GPU machine's return folder, which takes few files), suite.md, suite.json and logs.tar.gz (every
# log and JSON, no data) are copied there.
# The Python is $PYTHON, else python3: never a .venv, which may hold a CPU torch.
# --smoke: the same steps on CPU (debug model, 1 step each, eager, DeepSpeed on its CPU accelerator,
# FusedAdam's builder only looked up): a rehearsal of this script, not a measurement.
# --only STEPS: run only these steps (comma-separated names; "data" is needed by pretrain_deepspeed).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=full
out=runs/gpu_suite
bundle=${OUT:-}
budget=450
wheels=${WHEELHOUSE:-.whl}
target=/tmp/site
modes=""
only=""
usage="use --smoke, --out DIR, --budget SECONDS, --wheelhouse DIR, --target DIR, --modes LIST, --only STEPS"
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) mode=smoke ;;
    --out) out=$2; shift ;;
    --budget) budget=$2; shift ;;
    --wheelhouse) wheels=$2; shift ;;
    --target) target=$2; shift ;;
    --modes) modes=$2; shift ;;
    --only) only=$2; shift ;;
    *) echo "gpu_suite.sh: unknown argument $1 ($usage)" >&2; exit 2 ;;
  esac
  shift
done
deadline=$(( $(date +%s) + budget ))
if [ -z "$modes" ]; then
  if [ "$mode" = smoke ]; then modes=reduce-overhead; else modes=reduce-overhead,max-autotune-no-cudagraphs; fi
fi
[ "$modes" = none ] && modes=""
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Fresh outputs: never report an earlier run's JSON as this run's.
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ]; then
  if [ -f "$out/.gpu_suite" ]; then
    echo "> emptying $out (the output of an earlier suite run)"
    find "$out" -mindepth 1 -delete
  else
    echo "gpu_suite.sh: --out $out is not empty and not an earlier suite's output; name an empty or new directory" >&2
    exit 2
  fi
fi
mkdir -p "$out" && touch "$out/.gpu_suite" && : > "$out/steps.tsv" || exit 2

# DeepSpeed from the wheelhouse, installed into an empty --target exactly as on the GPU machine.
if [ "$mode" = smoke ]; then accel=cpu; else accel=cuda; fi
if ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
  if [ -d "$target" ] && [ -n "$(ls -A "$target")" ]; then
    if [ -f "$target/.gpu_suite_target" ]; then
      find "$target" -mindepth 1 -delete
    else
      echo "gpu_suite.sh: --target $target is not empty and not an earlier suite's target; name an empty or new directory" >&2
      exit 2
    fi
  fi
  echo "> installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $target (DeepSpeed accelerator: $accel)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$target" "$wheels"/*.whl || exit 2
  # The wheel records the accelerator of the machine that built it.
  sed -i "s/accelerator_name='[a-z]*'/accelerator_name='$accel'/" "$target/deepspeed/git_version_info_installed.py"
  touch "$target/.gpu_suite_target"
  export PYTHONPATH=$PYTHONPATH:$target PATH=$target/bin:$PATH
else
  echo "> no DeepSpeed wheel in $wheels: using the DeepSpeed $PYTHON imports, if any"
fi
export DS_ACCELERATOR=$accel
# One Python call: the environment (env.json); refuses a torch without CUDA in a full run.
"$PYTHON" benchmarks/suite_tools.py env "$out/env.json" --mode "$mode" --target "$target" || exit 2

# The data loader's C++ helpers (a few seconds on a fresh machine).
if ! "$PYTHON" -c "import megatron_cola.data._helpers" 2>/dev/null; then
  "$PYTHON" setup.py build_ext --inplace >"$out/build_ext.log" 2>&1 || echo "> build_ext failed (see $out/build_ext.log)"
fi

# FusedAdam's nvcc JIT build (about a minute) in the background, once, while the benchmarks run. A build
# killed earlier leaves torch_extensions' lock behind, and the next build would wait on it forever: in a
# full run nothing else builds on the machine, so any lock there is stale and is removed (at the start,
# and after a failed or killed build). The CPU rehearsal leaves the locks alone: other builds may hold them.
ext_dir=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}
clear_locks() {
  local lock
  for lock in $(find "$ext_dir" -maxdepth 3 -name lock -type f 2>/dev/null); do
    if [ "$mode" = full ]; then rm -f "$lock" && echo "> removed stale lock $lock"
    else echo "> (smoke) a full run would remove the lock $lock"; fi
  done
}
clear_locks
ops_args=(); [ "$mode" = smoke ] && ops_args=(--check)
ops_pid=""
ops_limit=$(( deadline - $(date +%s) - 15 )); [ "$ops_limit" -gt 300 ] && ops_limit=300
if [ "$ops_limit" -ge 10 ]; then
  timeout -k 5 "$ops_limit" "$PYTHON" benchmarks/suite_tools.py build-ops "${ops_args[@]}" \
    > "$out/build_ops.log" 2>&1 &
  ops_pid=$!
fi
wait_for_ops() {
  [ -z "$ops_pid" ] && return
  echo "> waiting for the FusedAdam build"
  wait "$ops_pid"; local rc=$?
  ops_pid=""
  [ "$rc" -ne 0 ] && echo "> the FusedAdam build failed or timed out (rc $rc, see build_ops.log)" && clear_locks
  tail -n 3 "$out/build_ops.log"
}
trap '[ -n "$ops_pid" ] && kill "$ops_pid" 2>/dev/null' EXIT

# run_step NAME CAP MIN COMMAND...: COMMAND with a limit of CAP seconds, cut to the time left before the
# deadline (less a reserve for the report); not started when fewer than MIN seconds are left.
reserve=15
run_step() {
  local name=$1 limit=$2 min=$3; shift 3
  if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return; fi
  local left=$(( deadline - $(date +%s) - reserve ))
  if [ "$left" -lt "$min" ]; then
    printf '%s\tskipped (deadline: %ss left)\t0\n' "$name" "$left" >> "$out/steps.tsv"
    echo "> $name: skipped (deadline: ${left}s left, needs ${min}s)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "> $name (limit ${limit}s): $*"
  local t0 status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  case $? in
    0) status=ok ;;
    124|137) status="timeout after ${limit}s" ;;
    *) status="failed (see $name.log)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$out/steps.tsv"
  tail -n 3 "$out/$name.log"
}

if [ "$mode" = smoke ]; then
  size=debug mbs=2 seq=64 dev=cpu vocab=512 compile=() min_bench=3 min_pre=5 docs=200
  timing=(--steps 1 --rounds 1 --warmup 1 --vocab-size "$vocab")
  pre=(--num-layers 2 --micro-batch-size 2 --train-iters 2 --log-interval 1)
else
  size=1B mbs=32 seq=256 dev=cuda vocab=32000 compile=(--compile) min_bench=60 min_pre=90 docs=500
  timing=(--steps 5 --rounds 2 --warmup 3)
  pre=(--micro-batch-size 16 --train-iters 20 --log-interval 5 --compile --grouped-projections)
fi
# bench NAME VARIANT COMPILE_MODE [CAP]: one variant of tools/bench_train.py in its own process.
bench() {
  run_step "$1" "${4:-150}" "$min_bench" "$PYTHON" tools/bench_train.py --device "$dev" --model-size "$size" \
    --seq-length "$seq" --micro-batch-size "$mbs" "${timing[@]}" "${compile[@]}" --compile-mode "$3" \
    --variants "$2" --json "$out/$1.json"
}

bench headline_full_rank full-rank+grouped default
bench headline_cola cola+grouped default
bench cola_m cola:cola-m+grouped default
run_step data 30 5 "$PYTHON" benchmarks/suite_tools.py data "$out/data/synthetic" --vocab-size "$vocab" \
  --documents "$docs"
if { [ -z "$only" ] || [[ ",$only," == *",pretrain_deepspeed,"* ]]; } &&
   [ $(( deadline - $(date +%s) - reserve )) -ge "$min_pre" ]; then
  wait_for_ops
fi
# --no-exit-signal-handler: on timeout SIGTERM ends the run now, not at the next step boundary.
run_step pretrain_deepspeed 180 "$min_pre" "$PYTHON" pretrain_cola.py --device "$dev" --model-size "$size" \
  --bf16 --zero-stage 1 --seq-length "$seq" --vocab-size "$vocab" --data-path "$out/data/synthetic" \
  --tokenizer-type NullTokenizer --eval-interval 100000 --eval-iters 0 --no-exit-signal-handler \
  --tensorboard-dir "$out/pretrain_deepspeed" "${pre[@]}"
IFS=, read -r -a mode_list <<< "$modes"
for m in "${mode_list[@]}"; do
  # max-autotune compiles for minutes: these steps may use all the time left (up to 240 s)
  [ -n "$m" ] && bench "cola_mode_$m" cola+grouped "$m" 240
done

"$PYTHON" benchmarks/suite_tools.py report "$out" > "$out/report.txt" 2>&1
if [ -n "$bundle" ]; then
  mkdir -p "$bundle" && cp "$out"/suite.md "$out"/suite.json "$bundle"/ 2>/dev/null
  tar -czf "$bundle/logs.tar.gz" -C "$out" --exclude=./data . 2>/dev/null
fi
echo "> results in $out (suite.json, suite.md, one log per step)${bundle:+; suite.md, suite.json, logs.tar.gz in $bundle}"
cat "$out/report.txt"
