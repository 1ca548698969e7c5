#!/usr/bin/env bash
# The debug-size CoLA model on the bundled sample corpus, 2 CPU processes (deepspeed launcher, gloo),
# ZeRO-1, bf16. Finishes in a few minutes on 2 cores. `make quickstart` prepares the data and runs this.
#
# Environment: DATA_PATH [data/sample/sample_8k_text_document]  TOKENIZER_MODEL [data/tokenizer/sample_8k.model]
#   SAVE_DIR [runs/quickstart/cola]  TRAIN_ITERS [200]  NPROC [2]  FULL_RANK=1 for the LLaMA baseline
#   ZERO_STAGE [1]  RECOMPUTE [none]  LAUNCHER [deepspeed|torchrun]  EXTRA_ARGS
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
DATA_PATH="${DATA_PATH:-data/sample/sample_8k_text_document}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:-data/tokenizer/sample_8k.model}"
FULL_RANK="${FULL_RANK:-0}"
VARIANT=cola
if [[ "$FULL_RANK" == 1 ]]; then VARIANT=full; fi
SAVE_DIR="${SAVE_DIR:-runs/quickstart/$VARIANT}"
NPROC="${NPROC:-2}"
LAUNCHER="${LAUNCHER:-deepspeed}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

args=(
  --model-size debug --seq-length 256 --micro-batch-size 4 --global-batch-size 16
  --train-iters "${TRAIN_ITERS:-200}" --lr 3e-3 --lr-warmup-iters 20 --lr-decay-style cosine
  --bf16 --zero-stage "${ZERO_STAGE:-1}" --recompute "${RECOMPUTE:-none}" --device cpu
  --data-path "$DATA_PATH" --split "98,1,1"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 100
  --eval-interval 50 --eval-iters 4 --log-interval 10 --tensorboard-dir "$SAVE_DIR/tensorboard"
)
if [[ "$FULL_RANK" == 1 ]]; then args+=(--full-rank); fi
if [[ -n "${EXTRA_ARGS:-}" ]]; then
  read -r -a extra_words <<< "$EXTRA_ARGS"
  args+=("${extra_words[@]}")
fi
PY="${PYTHON:-python}"
if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PY="$REPO_DIR/.venv/bin/python"; fi
case "$LAUNCHER" in
  deepspeed) exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" pretrain_cola.py "${args[@]}" ;;
  torchrun) exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" pretrain_cola.py "${args[@]}" ;;
  *) echo "LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac
