#!/usr/bin/env bash
# Pre-training started by Open MPI: mpirun starts the ranks, pretrain_cola.py finds its rank through
# mpi4py (DeepSpeed's MPI discovery) and sets up torch.distributed itself. Needs `pip install mpi4py`
# (or `make setup-mpi`) and Open MPI (`apt-get install openmpi-bin libopenmpi-dev`).
# The recipe is examples/pretrain_cola_<SIZE>.sh's (debug by default: the sample corpus on CPU), run with
# LAUNCHER=mpirun; every variable of examples/common.sh applies (TRAIN_ITERS, WARMUP, SAVE_DIR, ...):
#
#   NP=2 bash examples/mpi/pretrain_cola_mpi.sh                         # CPU, the debug model, sample corpus
#   NP=2 TRAIN_ITERS=5 bash examples/mpi/pretrain_cola_mpi.sh           # warmup follows TRAIN_ITERS
#   NP=16 HOSTS=node1:8,node2:8 MASTER_ADDR=node1 SIZE=1b DATA_PATH=... TOKENIZER_MODEL=... \
#       bash examples/mpi/pretrain_cola_mpi.sh
# Arguments are appended to pretrain_cola.py's flags. As root, mpirun gets --allow-run-as-root; with more
# ranks than cores on one host, --oversubscribe.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SIZE="${SIZE:-debug}"
export NP="${NP:-2}"
if [[ "${LAUNCHER:-}" != none ]]; then export LAUNCHER=mpirun; fi   # none: print the command only
if [[ "$SIZE" == debug ]]; then export SAVE_DIR="${SAVE_DIR:-$repo/runs/mpi}"; fi
exec "$repo/examples/pretrain_cola_${SIZE,,}.sh" "$@"
