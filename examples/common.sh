#!/usr/bin/env bash
# Shared part of the pretrain_cola_<size>.sh launchers: `common.sh SIZE [flags]` finds the Python
# environment (env.sh) and runs `python -m megatron_cola.launch SIZE [flags]`, which reads the recipe
# (recipes/<size>.toml) and the environment knobs below, prints the resolved command and starts the ranks.
# Flags given to the size script are passed to pretrain_cola.py last (they win over the recipe):
#   bash examples/pretrain_cola_debug.sh --train-iters 20
#
# Environment (defaults in brackets; the table with every knob is in docs/launching.md):
#   DATA_PATH        preprocessed prefix(es), e.g. "0.7 c4_text_document 0.3 pile_text_document"   [required]
#   TOKENIZER_MODEL  SentencePiece .model or HF tokenizer dir                                          [required]
#   TOKENIZER_TYPE   [SentencePieceTokenizer]
#   SAVE_DIR         checkpoints (resumes from here too)   [<checkout>/checkpoints/cola_<SIZE> or full_<SIZE>,
#                    plus _<hash> of --num-layers/--hidden-size/... overrides when given]
#   TB_DIR           TensorBoard + metrics.jsonl            [$SAVE_DIR/tensorboard]
#   NNODES [1]  GPUS_PER_NODE [the GPUs torch sees; no GPU: 2 CPU ranks]  HOSTFILE  MASTER_ADDR
#   MASTER_PORT      [a free port on a single node, 29500 on several]
#   TP [1]      tensor-model-parallel size      ZERO_STAGE [the recipe's]    MICRO_BATCH [the recipe's]
#   DS_CONFIG   a DeepSpeed JSON (e.g. examples/ds_config_zero3.json) instead of ZERO_STAGE
#   GLOBAL_BATCH, SEQ_LENGTH, RECOMPUTE [none|full|cola-m], WARMUP, TRAIN_ITERS, SPLIT, DEVICE, SAVE_INTERVAL,
#   EVAL_INTERVAL, EVAL_ITERS, LOG_INTERVAL, FFN_HIDDEN_SIZE [the recipe's]   FULL_RANK=1 for the LLaMA baseline
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
#   EXTRA_ARGS  appended verbatim (before the script's own arguments)
# When the ranks fail, their one-line error is printed last, below the launcher's own output.
set -euo pipefail
: "${1:?usage: common.sh SIZE [pretrain_cola.py flags]}"

# shellcheck source=examples/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export EXIT_SIGNAL_HANDLER
exec "$PYTHON" -u -m megatron_cola.launch "$@"
