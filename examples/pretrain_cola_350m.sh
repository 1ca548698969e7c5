#!/usr/bin/env bash
# CoLA-350M with the paper's recipe (FULL_RANK=1 for the LLaMA baseline): lr 3e-3, warmup 6000, 60000 steps of
# 512 x 256 tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16. See examples/common.sh for the
# environment variables (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, ...).
set -euo pipefail
export MODEL_SIZE=350M LR=3e-3 MIN_LR=3e-4 WARMUP=6000 TRAIN_ITERS=${TRAIN_ITERS:-60000}
export DEFAULT_MICRO_BATCH=32
exec "$(dirname "$0")/common.sh"
