#!/usr/bin/env bash
# The debug-size CoLA model on the bundled sample corpus, recipes/debug.toml: 2 CPU processes, ZeRO-1,
# bf16; finishes in a few minutes on 2 cores. `make quickstart` prepares the data and runs this.
# Defaults (the recipe's [launcher] table): DATA_PATH data/sample/sample_8k_text_document,
# TOKENIZER_MODEL data/tokenizer/sample_8k.model, SAVE_DIR runs/quickstart/cola (or full),
# GPUS_PER_NODE (or NPROC) 2, WARMUP 10% of TRAIN_ITERS (at most 20).
# The environment knobs (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, SAVE_DIR, ...)
# are in examples/common.sh and docs/launching.md; flags after the script name go to pretrain_cola.py.
#
#   bash examples/pretrain_cola_debug.sh [flags]            common.sh starts the ranks (LAUNCHER=...)
#   deepspeed [--num_gpus N] examples/pretrain_cola_debug.sh [flags]
# The deepspeed launcher runs this file with python on every rank, so it is bash and Python at once:
# both halves hand the size to megatron_cola/launch.py, which resolves the recipe and the environment.
''':'
exec "$(dirname "${BASH_SOURCE[0]}")/common.sh" debug "$@"
: ''' #' <<'# end of the Python part'
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_cola.launch import run_rank  # noqa: E402

run_rank("debug")
# end of the Python part
