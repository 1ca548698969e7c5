#!/usr/bin/env bash
# CoLA-60M with the paper's recipe (FULL_RANK=1 for the LLaMA baseline): lr 6e-3, warmup 2000, 10000 steps of
# 512 x 256 tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16. See examples/common.sh for the
# environment variables (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, ...).
set -euo pipefail
export MODEL_SIZE=60M LR=6e-3 MIN_LR=6e-4 WARMUP=2000 TRAIN_ITERS=${TRAIN_ITERS:-10000}
export DEFAULT_MICRO_BATCH=64
exec "$(dirname "$0")/common.sh"
