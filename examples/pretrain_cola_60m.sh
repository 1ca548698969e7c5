#!/usr/bin/env bash
# CoLA-60M with the paper's recipe (FULL_RANK=1 for the LLaMA baseline): lr 6e-3, warmup 2000, 10000 steps of
# 512 x 256 tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16. See examples/common.sh for the
# environment variables (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, ...).
#
# This file is bash and Python at once. `bash examples/pretrain_cola_60m.sh` resolves the recipe and starts the
# ranks (examples/common.sh). `deepspeed [--num_gpus N] [--hostfile H] examples/pretrain_cola_60m.sh [flags]` runs it
# with python on every rank, which resolves this same recipe through bash (megatron_cola/launch.py) and
# becomes pretrain_cola.py. Extra flags after the script name go to pretrain_cola.py.
''':'
set -euo pipefail
export MODEL_SIZE=60M LR=6e-3 MIN_LR=6e-4 WARMUP=${WARMUP:-2000} TRAIN_ITERS=${TRAIN_ITERS:-10000}
export DEFAULT_MICRO_BATCH=64
exec "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
: ''' #' <<'# end of the Python part'
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_cola.launch import run_rank  # noqa: E402

run_rank(__file__)
# end of the Python part
