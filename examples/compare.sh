#!/usr/bin/env bash
# `make compare`: the debug CoLA model (rank 64) and its full-rank twin, trained on the bundled sample corpus
# for the same tokens (200 steps x 16 x 256 = 819k tokens, 2 CPU processes, ZeRO-1, bf16, the recipe of
# examples/pretrain_cola_debug.sh), then their loss against tokens and against training FLOPs in one PNG,
# and a markdown table (parameters, tokens, FLOPs, training time, final validation loss).
# Idempotent: a second run reuses the data and the finished checkpoints and only redraws.
#
# Environment: RUN_DIR [runs/compare]  OUTPUT [$RUN_DIR/debug_cola_vs_full.png]  TABLE [$RUN_DIR/table.md]
#              TRAIN_ITERS [200] and the other variables of examples/pretrain_cola_debug.sh
set -euo pipefail
# shellcheck source=examples/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_DIR"
PY="$PYTHON"
RUN_DIR="${RUN_DIR:-runs/compare}"
OUTPUT="${OUTPUT:-$RUN_DIR/debug_cola_vs_full.png}"
TABLE="${TABLE:-$RUN_DIR/table.md}"
export OMP_NUM_THREADS=1
start=$(date +%s)
step() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

# The same data as `make quickstart` (each step is skipped when its output exists).
step "sample corpus, 8k SentencePiece tokenizer, Megatron .bin/.idx -> data/"
"$PY" tools/prepare_sample_corpus.py --output-dir data/sample
if [[ ! -f data/tokenizer/sample_8k.model ]]; then
  "$PY" tools/train_tokenizer.py --input data/sample/train.jsonl --vocab-size 8000 \
    --model-prefix data/tokenizer/sample_8k
fi
if [[ ! -f data/sample/sample_8k_text_document.idx ]]; then
  "$PY" tools/preprocess_data.py --input data/sample/train.jsonl --output-prefix data/sample/sample_8k \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample_8k.model \
    --append-eod --workers 2
fi

for variant in cola full; do
  t0=$(date +%s)
  step "pre-train the debug ${variant} model -> $RUN_DIR/$variant"
  if [[ "$variant" == full ]]; then
    FULL_RANK=1 SAVE_DIR="$RUN_DIR/$variant" bash examples/pretrain_cola_debug.sh
  else
    FULL_RANK=0 SAVE_DIR="$RUN_DIR/$variant" bash examples/pretrain_cola_debug.sh
  fi
  echo "$variant: $(( $(date +%s) - t0 )) s wall time (start-up, training, evaluation, saving)"
done

step "loss vs tokens and vs training FLOPs -> $OUTPUT, table -> $TABLE"
"$PY" tools/plot_runs.py --run "CoLA debug (r=64)=$RUN_DIR/cola" --run "full rank debug=$RUN_DIR/full" \
  --x tokens --x flops --output "$OUTPUT" --table "$TABLE" \
  --title "Debug CoLA vs full rank on the sample corpus, same tokens"
step "done in $(( $(date +%s) - start )) s"
