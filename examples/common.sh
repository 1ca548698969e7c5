#!/usr/bin/env bash
# Shared part of the pretrain_cola_*.sh launchers. The size scripts set the paper's recipe
# (MODEL_SIZE, LR, WARMUP, TRAIN_ITERS, ...) and source this file, which reads the cluster layout from
# the environment and starts pretrain_cola.py with the deepspeed launcher.
#
# Environment (defaults in brackets):
#   DATA_PATH        preprocessed prefix(es), e.g. "0.7 c4_text_document 0.3 pile_text_document"   [required]
#   TOKENIZER_MODEL  SentencePiece .model or HF tokenizer dir                                          [required]
#   TOKENIZER_TYPE   [SentencePieceTokenizer]
#   SAVE_DIR         checkpoints (resumes from here too)       [checkpoints/cola_$MODEL_SIZE or ..._full]
#   TB_DIR           TensorBoard + metrics.jsonl                [$SAVE_DIR/tensorboard]
#   NNODES [1]  GPUS_PER_NODE [8]  HOSTFILE (multi-node: "host slots=N" lines)  MASTER_ADDR  MASTER_PORT [29500]
#   TP [1]      tensor-model-parallel size      ZERO_STAGE [1]    MICRO_BATCH [size default]
#   DS_CONFIG   a DeepSpeed JSON (e.g. examples/ds_config_zero3.json) instead of ZERO_STAGE
#   GLOBAL_BATCH [512]   SEQ_LENGTH [256]   RECOMPUTE [none|full|cola-m]   FULL_RANK=1 for the LLaMA baseline
#   LAUNCHER [deepspeed|torchrun|none]  (none: print the command only)   EXTRA_ARGS  appended verbatim
set -euo pipefail

: "${MODEL_SIZE:?set by the size script}"
: "${LR:?}" "${MIN_LR:?}" "${WARMUP:?}" "${TRAIN_ITERS:?}"
: "${DEFAULT_MICRO_BATCH:=32}"

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_PATH="${DATA_PATH:?set DATA_PATH to a preprocessed prefix (tools/preprocess_data.py)}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer used to preprocess}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-SentencePieceTokenizer}"
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
TP="${TP:-1}"
ZERO_STAGE="${ZERO_STAGE:-1}"
MICRO_BATCH="${MICRO_BATCH:-$DEFAULT_MICRO_BATCH}"
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
SEQ_LENGTH="${SEQ_LENGTH:-256}"
RECOMPUTE="${RECOMPUTE:-none}"
FULL_RANK="${FULL_RANK:-0}"
LAUNCHER="${LAUNCHER:-deepspeed}"
VARIANT=cola
if [[ "$FULL_RANK" == 1 ]]; then VARIANT=full; fi
SAVE_DIR="${SAVE_DIR:-checkpoints/${VARIANT}_${MODEL_SIZE}}"
TB_DIR="${TB_DIR:-$SAVE_DIR/tensorboard}"

read -r -a data_path_words <<< "$DATA_PATH"
args=(
  --model-size "$MODEL_SIZE"
  --seq-length "$SEQ_LENGTH"
  --micro-batch-size "$MICRO_BATCH"
  --global-batch-size "$GLOBAL_BATCH"
  --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine
  --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95
  --bf16 --tensor-model-parallel-size "$TP" --recompute "$RECOMPUTE"
  --data-path "${data_path_words[@]}" --split "969,30,1"
  --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
  --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval "${SAVE_INTERVAL:-1000}"
  --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}" --log-interval "${LOG_INTERVAL:-10}"
  --tensorboard-dir "$TB_DIR"
)
if [[ -n "${DS_CONFIG:-}" ]]; then
  args+=(--deepspeed_config "$DS_CONFIG")   # ZeRO stage and clipping come from the file
else
  args+=(--zero-stage "$ZERO_STAGE" --clip-grad 0.5)
fi
if [[ "$FULL_RANK" == 1 ]]; then args+=(--full-rank); fi
if [[ -n "${FFN_HIDDEN_SIZE:-}" ]]; then args+=(--ffn-hidden-size "$FFN_HIDDEN_SIZE"); fi
if [[ -n "${EXTRA_ARGS:-}" ]]; then
  read -r -a extra_words <<< "$EXTRA_ARGS"
  args+=("${extra_words[@]}")
fi

case "$LAUNCHER" in
  deepspeed)
    launch=(deepspeed --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
    if [[ -n "${DS_LAUNCHER_ARGS:-}" ]]; then
      read -r -a ds_words <<< "$DS_LAUNCHER_ARGS"
      launch+=("${ds_words[@]}")
    fi
    if [[ -n "${HOSTFILE:-}" ]]; then launch+=(--hostfile "$HOSTFILE"); fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then launch+=(--master_addr "$MASTER_ADDR"); fi
    launch+=("$REPO_DIR/pretrain_cola.py")
    ;;
  torchrun)
    launch=(torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
            --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:$MASTER_PORT"
            "$REPO_DIR/pretrain_cola.py")
    ;;
  none) launch=(echo python "$REPO_DIR/pretrain_cola.py") ;;
  *) echo "LAUNCHER must be deepspeed, torchrun or none, got '$LAUNCHER'" >&2; exit 2 ;;
esac

mkdir -p "$SAVE_DIR"
echo "launching: ${launch[*]} ${args[*]}"
exec "${launch[@]}" "${args[@]}"
