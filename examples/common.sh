#!/usr/bin/env bash
# Shared part of the pretrain_cola_*.sh launchers. A size script sets the recipe (MODEL_SIZE, LR, MIN_LR,
# WARMUP, TRAIN_ITERS, DEFAULT_MICRO_BATCH, ...) and runs this file with its own arguments; this file reads
# the cluster layout from the environment, builds pretrain_cola.py's flags and starts the ranks.
# Arguments given to the size script are appended to the flags (they win over the recipe):
#   bash examples/pretrain_cola_debug.sh --train-iters 20
#
# Environment (defaults in brackets):
#   DATA_PATH        preprocessed prefix(es), e.g. "0.7 c4_text_document 0.3 pile_text_document"   [required]
#   TOKENIZER_MODEL  SentencePiece .model or HF tokenizer dir                                          [required]
#   TOKENIZER_TYPE   [SentencePieceTokenizer]
#   SAVE_DIR         checkpoints (resumes from here too)       [checkpoints/cola_$MODEL_SIZE or ..._full]
#   TB_DIR           TensorBoard + metrics.jsonl                [$SAVE_DIR/tensorboard]
#   NNODES [1]  GPUS_PER_NODE [8; debug: 2]  HOSTFILE (multi-node: "host slots=N" lines)  MASTER_ADDR
#   MASTER_PORT      [a free port on a single node, 29500 on several]
#   TP [1]      tensor-model-parallel size      ZERO_STAGE [1]    MICRO_BATCH [size default]
#   DS_CONFIG   a DeepSpeed JSON (e.g. examples/ds_config_zero3.json) instead of ZERO_STAGE
#   GLOBAL_BATCH [512]   SEQ_LENGTH [256]   RECOMPUTE [none|full|cola-m]   FULL_RANK=1 for the LLaMA baseline
#   WARMUP, TRAIN_ITERS, SPLIT [969,30,1], DEVICE [auto], SAVE_INTERVAL, EVAL_INTERVAL, EVAL_ITERS, LOG_INTERVAL
#   OMP_NUM_THREADS [1]  threads per rank (torchrun's default; set it higher for CPU-heavy data work)
#   EXIT_SIGNAL_HANDLER [1]   see env.sh. The ranks exit 0 after a signal-triggered save; the launcher's
#                    own status differs: torchrun exits 1 when it got the signal itself, the deepspeed
#                    runner dies of it (docs/reliability.md, "Exit status by launcher")
#   LAUNCHER [deepspeed]  how the ranks start:
#     deepspeed  python -m deepspeed.launcher.runner (single node: local, no ssh; HOSTFILE: pdsh/ssh)
#     torchrun   torch.distributed.run (c10d rendezvous at MASTER_ADDR:MASTER_PORT; run it on every node)
#     srun       one task per GPU inside a SLURM allocation (SLURM_NNODES x GPUS_PER_NODE tasks)
#     mpirun     Open MPI, NP [NNODES x GPUS_PER_NODE] ranks, HOSTS "node1:8,node2:8" (needs mpi4py)
#     none       print the command, shell-quoted, instead of running it
#     args       print pretrain_cola.py's flags NUL-separated (what megatron_cola/launch.py reads)
#   EXTRA_ARGS  appended verbatim (before the script's own arguments)
set -euo pipefail

: "${MODEL_SIZE:?set by the size script}"
: "${LR:?}" "${MIN_LR:?}" "${WARMUP:?}" "${TRAIN_ITERS:?}"
: "${DEFAULT_MICRO_BATCH:=32}"

# shellcheck source=examples/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
LAUNCHER="${LAUNCHER:-deepspeed}"
missing_hint="set it in the environment"
if [[ "$LAUNCHER" == args ]]; then
  # A rank of `deepspeed --hostfile H examples/pretrain_cola_<size>.sh` on another node sees only what
  # the deepspeed runner exports there.
  missing_hint="set it in the environment (ranks on other nodes of a deepspeed --hostfile launch see only the variables listed in .deepspeed_env; or run 'bash examples/pretrain_cola_<size>.sh' with HOSTFILE)"
fi
DATA_PATH="${DATA_PATH:?DATA_PATH: a preprocessed prefix (tools/preprocess_data.py); $missing_hint}"
TOKENIZER_MODEL="${TOKENIZER_MODEL:?TOKENIZER_MODEL: the tokenizer used to preprocess; $missing_hint}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-SentencePieceTokenizer}"
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-1}"
ZERO_STAGE="${ZERO_STAGE:-1}"
MICRO_BATCH="${MICRO_BATCH:-$DEFAULT_MICRO_BATCH}"
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"
SEQ_LENGTH="${SEQ_LENGTH:-256}"
RECOMPUTE="${RECOMPUTE:-none}"
FULL_RANK="${FULL_RANK:-0}"
VARIANT=cola
if [[ "$FULL_RANK" == 1 ]]; then VARIANT=full; fi
SAVE_DIR="${SAVE_DIR:-checkpoints/${VARIANT}_${MODEL_SIZE}}"
TB_DIR="${TB_DIR:-$SAVE_DIR/tensorboard}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

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
  --data-path "${data_path_words[@]}" --split "${SPLIT:-969,30,1}"
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
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "$DEVICE"); fi
if [[ "$FULL_RANK" == 1 ]]; then args+=(--full-rank); fi
if [[ -n "${FFN_HIDDEN_SIZE:-}" ]]; then args+=(--ffn-hidden-size "$FFN_HIDDEN_SIZE"); fi
if [[ "$EXIT_SIGNAL_HANDLER" == 1 ]]; then args+=(--exit-signal-handler); else args+=(--no-exit-signal-handler); fi
if [[ -n "${EXTRA_ARGS:-}" ]]; then
  read -r -a extra_words <<< "$EXTRA_ARGS"
  args+=("${extra_words[@]}")
fi
args+=("$@")

if [[ -z "${MASTER_PORT:-}" ]]; then
  if [[ "$NNODES" == 1 ]]; then MASTER_PORT="$(cola_free_port)"; else MASTER_PORT=29500; fi
fi
ENTRY="$REPO_DIR/pretrain_cola.py"
case "$LAUNCHER" in
  deepspeed)
    launch=("$PYTHON" -u -m deepspeed.launcher.runner --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE"
            --master_port "$MASTER_PORT")
    if [[ -n "${DS_LAUNCHER_ARGS:-}" ]]; then
      read -r -a ds_words <<< "$DS_LAUNCHER_ARGS"
      launch+=("${ds_words[@]}")
    fi
    # A hostfile makes the runner start every node over pdsh/ssh (even a single one): give it only for
    # several nodes.
    if [[ -n "${HOSTFILE:-}" ]]; then launch+=(--hostfile "$HOSTFILE"); fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then launch+=(--master_addr "$MASTER_ADDR"); fi
    launch+=("$ENTRY")
    ;;
  torchrun)
    launch=("$PYTHON" -u -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE"
            --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:$MASTER_PORT" "$ENTRY")
    ;;
  srun)
    : "${SLURM_JOB_ID:?LAUNCHER=srun runs inside a SLURM allocation (sbatch or salloc)}"
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    export MASTER_PORT
    launch=(srun --nodes "${SLURM_NNODES:-$NNODES}" --ntasks-per-node "$GPUS_PER_NODE" --kill-on-bad-exit=1)
    # Slurm 22.05's srun does not inherit the allocation's --cpus-per-task: pass it on.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then launch+=(--cpus-per-task "$SLURM_CPUS_PER_TASK"); fi
    launch+=("$PYTHON" -u "$ENTRY")
    ;;
  mpirun)
    NP="${NP:-$((NNODES * GPUS_PER_NODE))}"
    launch=(mpirun -np "$NP" -x OMP_NUM_THREADS -x PATH -x MASTER_PORT="$MASTER_PORT")
    if [[ -n "${MASTER_ADDR:-}" ]]; then launch+=(-x MASTER_ADDR="$MASTER_ADDR"); fi
    if [[ -n "${HOSTS:-}" ]]; then launch+=(--host "$HOSTS"); fi
    if [[ "$(id -u)" == 0 ]]; then launch+=(--allow-run-as-root); fi
    if [[ -z "${HOSTS:-}" && "$NP" -gt "$(nproc)" ]]; then launch+=(--oversubscribe); fi
    launch+=("$PYTHON" -u "$ENTRY")
    ;;
  none)
    echo "# MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=$MASTER_PORT NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE"
    printf '%q ' python "$ENTRY" "${args[@]}"
    echo
    exit 0
    ;;
  args)
    printf '%s\0' "${args[@]}"
    exit 0
    ;;
  *) echo "LAUNCHER must be deepspeed, torchrun, srun, mpirun, none or args, got '$LAUNCHER'" >&2; exit 2 ;;
esac

mkdir -p "$SAVE_DIR"
echo "launching: ${launch[*]} ${args[*]}"
exec "${launch[@]}" "${args[@]}"
