#!/usr/bin/env bash
# CoLA-7B with the paper's recipe (FULL_RANK=1 for the LLaMA baseline): lr 1e-3, warmup 15000, 150000 steps of
# 512 x 256 tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16. See examples/common.sh for the
# environment variables (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, ...).
set -euo pipefail
export MODEL_SIZE=7B LR=1e-3 MIN_LR=1e-4 WARMUP=15000 TRAIN_ITERS=${TRAIN_ITERS:-150000}
export DEFAULT_MICRO_BATCH=16
# 7B: ZeRO-2 and CoLA-M by default; one node of 8 GPUs runs it with TP=1, or TP=2/4 to cut memory further.
export ZERO_STAGE="${ZERO_STAGE:-2}"
export RECOMPUTE="${RECOMPUTE:-cola-m}"
if [[ "${FULL_RANK:-0}" == 1 && "$RECOMPUTE" == cola-m ]]; then export RECOMPUTE=full; fi
exec "$(dirname "$0")/common.sh"
