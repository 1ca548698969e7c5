#!/usr/bin/env bash
# CoLA-7B with the paper's recipe (FULL_RANK=1 for the LLaMA baseline): lr 1e-3, warmup 15000, 150000 steps of
# 512 x 256 tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16. See examples/common.sh for the
# environment variables (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, ...).
#
# This file is bash and Python at once. `bash examples/pretrain_cola_7b.sh` resolves the recipe and starts the
# ranks (examples/common.sh). `deepspeed [--num_gpus N] [--hostfile H] examples/pretrain_cola_7b.sh [flags]` runs it
# with python on every rank, which resolves this same recipe through bash (megatron_cola/launch.py) and
# becomes pretrain_cola.py. Extra flags after the script name go to pretrain_cola.py.
''':'
set -euo pipefail
export MODEL_SIZE=7B LR=1e-3 MIN_LR=1e-4 WARMUP=${WARMUP:-15000} TRAIN_ITERS=${TRAIN_ITERS:-150000}
export DEFAULT_MICRO_BATCH=16
# 7B: ZeRO-2 and CoLA-M by default; one node of 8 GPUs runs it with TP=1, or TP=2/4 to cut memory further.
export ZERO_STAGE="${ZERO_STAGE:-2}"
export RECOMPUTE="${RECOMPUTE:-cola-m}"
if [[ "${FULL_RANK:-0}" == 1 && "$RECOMPUTE" == cola-m ]]; then export RECOMPUTE=full; fi
exec "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
: ''' #' <<'# end of the Python part'
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_cola.launch import run_rank  # noqa: E402

run_rank(__file__)
# end of the Python part
