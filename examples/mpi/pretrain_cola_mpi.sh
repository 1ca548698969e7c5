#!/usr/bin/env bash
# Pre-training started by Open MPI: mpirun starts the ranks, pretrain_cola.py finds its rank through
# mpi4py (DeepSpeed's MPI discovery) and sets up torch.distributed itself. Needs `pip install mpi4py`
# (or `pip install -e .[mpi]`) and Open MPI (`apt-get install openmpi-bin libopenmpi-dev`).
#
#   NP=2 bash examples/mpi/pretrain_cola_mpi.sh                    # CPU, the debug model, sample corpus
#   NP=16 HOSTS=node1:8,node2:8 MODEL_SIZE=1B DEVICE=cuda EXTRA_ARGS="--bf16 --zero-stage 2" bash ...
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_DIR"
NP="${NP:-2}"
PY="${PYTHON:-python}"
if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PY="$REPO_DIR/.venv/bin/python"; fi
mpi_args=(-np "$NP" -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x PATH -x MASTER_PORT="${MASTER_PORT:-29500}")
if [[ -n "${HOSTS:-}" ]]; then mpi_args+=(--host "$HOSTS"); fi
if [[ "$(id -u)" == 0 ]]; then mpi_args+=(--allow-run-as-root); fi
if [[ "$NP" -gt "$(nproc)" ]]; then mpi_args+=(--oversubscribe); fi

args=(
  --model-size "${MODEL_SIZE:-debug}" --seq-length "${SEQ_LENGTH:-256}" --micro-batch-size "${MICRO_BATCH:-4}"
  --global-batch-size "${GLOBAL_BATCH:-$((4 * NP))}" --train-iters "${TRAIN_ITERS:-50}" --lr "${LR:-3e-3}"
  --lr-warmup-iters 10 --device "${DEVICE:-cpu}"
  --data-path "${DATA_PATH:-data/sample/sample_8k_text_document}" --split "98,1,1"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "${TOKENIZER_MODEL:-data/tokenizer/sample_8k.model}"
  --save "${SAVE_DIR:-runs/mpi}" --load "${SAVE_DIR:-runs/mpi}"
  --eval-interval 25 --eval-iters 2 --log-interval 5 --tensorboard-dir "${SAVE_DIR:-runs/mpi}/tensorboard"
)
if [[ -n "${EXTRA_ARGS:-}" ]]; then
  read -r -a extra_words <<< "$EXTRA_ARGS"
  args+=("${extra_words[@]}")
fi
exec mpirun "${mpi_args[@]}" "$PY" pretrain_cola.py "${args[@]}"
