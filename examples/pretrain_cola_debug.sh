#!/usr/bin/env bash
# The debug-size CoLA model on the bundled sample corpus, 2 CPU processes, ZeRO-1, bf16. Finishes in a
# few minutes on 2 cores. `make quickstart` prepares the data and runs this.
#
# Environment (besides examples/common.sh's): DATA_PATH [data/sample/sample_8k_text_document]
#   TOKENIZER_MODEL [data/tokenizer/sample_8k.model]  SAVE_DIR [runs/quickstart/cola]  TRAIN_ITERS [200]
#   WARMUP [10% of TRAIN_ITERS, at most 20]  GPUS_PER_NODE or NPROC [2]  DEVICE [cpu]  FULL_RANK=1 for the
#   LLaMA baseline  ZERO_STAGE [1]  RECOMPUTE [none]  LAUNCHER [deepspeed|torchrun|srun|mpirun]  EXTRA_ARGS
#
# This file is bash and Python at once. `bash examples/pretrain_cola_debug.sh` resolves the recipe and starts the
# ranks (examples/common.sh). `deepspeed [--num_gpus N] [--hostfile H] examples/pretrain_cola_debug.sh [flags]` runs it
# with python on every rank, which resolves this same recipe through bash (megatron_cola/launch.py) and
# becomes pretrain_cola.py. Extra flags after the script name go to pretrain_cola.py.
''':'
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
variant=cola
if [[ "${FULL_RANK:-0}" == 1 ]]; then variant=full; fi
export MODEL_SIZE=debug LR=3e-3 MIN_LR=3e-4 TRAIN_ITERS="${TRAIN_ITERS:-200}"
export WARMUP="${WARMUP:-$(( TRAIN_ITERS / 10 < 20 ? TRAIN_ITERS / 10 : 20 ))}"
export DEFAULT_MICRO_BATCH=4 GLOBAL_BATCH="${GLOBAL_BATCH:-16}" SPLIT="${SPLIT:-98,1,1}" DEVICE="${DEVICE:-cpu}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${NPROC:-2}}"
export DATA_PATH="${DATA_PATH:-$repo/data/sample/sample_8k_text_document}"
export TOKENIZER_MODEL="${TOKENIZER_MODEL:-$repo/data/tokenizer/sample_8k.model}"
export SAVE_DIR="${SAVE_DIR:-$repo/runs/quickstart/$variant}"
export SAVE_INTERVAL="${SAVE_INTERVAL:-100}" EVAL_INTERVAL="${EVAL_INTERVAL:-50}" EVAL_ITERS="${EVAL_ITERS:-4}"
export LOG_INTERVAL="${LOG_INTERVAL:-10}"
exec "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
: ''' #' <<'# end of the Python part'
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_cola.launch import run_rank  # noqa: E402

run_rank(__file__)
# end of the Python part
