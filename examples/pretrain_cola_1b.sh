#!/usr/bin/env bash
# CoLA-1B with the paper's recipe (FULL_RANK=1 for the LLaMA baseline): lr 2e-3, warmup 10000, 100000 steps of
# 512 x 256 tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16. See examples/common.sh for the
# environment variables (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, ...).
#
# This file is bash and Python at once. `bash examples/pretrain_cola_1b.sh` resolves the recipe and starts the
# ranks (examples/common.sh). `deepspeed [--num_gpus N] [--hostfile H] examples/pretrain_cola_1b.sh [flags]` runs it
# with python on every rank, which resolves this same recipe through bash (megatron_cola/launch.py) and
# becomes pretrain_cola.py. Extra flags after the script name go to pretrain_cola.py.
''':'
set -euo pipefail
export MODEL_SIZE=1B LR=2e-3 MIN_LR=2e-4 WARMUP=${WARMUP:-10000} TRAIN_ITERS=${TRAIN_ITERS:-100000}
export DEFAULT_MICRO_BATCH=32
# 1B's ffn (5461) does not split over TP > 1: pad it to the next multiple of TP (a 0.02% larger MLP).
TP="${TP:-1}"
if [[ "$TP" -gt 1 && -z "${FFN_HIDDEN_SIZE:-}" ]]; then
  export FFN_HIDDEN_SIZE=$(( (5461 + TP - 1) / TP * TP ))
fi
exec "$(dirname "${BASH_SOURCE[0]}")/common.sh" "$@"
: ''' #' <<'# end of the Python part'
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_cola.launch import run_rank  # noqa: E402

run_rank(__file__)
# end of the Python part
