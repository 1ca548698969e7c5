#!/usr/bin/env bash
# CoLA-130M with the paper's recipe, recipes/130m.toml (lr 3e-3, warmup 2000, 20000 steps of 512 x 256
# tokens, cosine to 0.1x, AdamW wd 0.01, clip 0.5, bf16); FULL_RANK=1 for the LLaMA baseline.
# The environment knobs (DATA_PATH, TOKENIZER_MODEL, NNODES, GPUS_PER_NODE, TP, ZERO_STAGE, SAVE_DIR, ...)
# are in examples/common.sh and docs/launching.md; flags after the script name go to pretrain_cola.py.
#
#   bash examples/pretrain_cola_130m.sh [flags]            common.sh starts the ranks (LAUNCHER=...)
#   deepspeed [--num_gpus N] examples/pretrain_cola_130m.sh [flags]
# The deepspeed launcher runs this file with python on every rank, so it is bash and Python at once:
# both halves hand the size to megatron_cola/launch.py, which resolves the recipe and the environment.
''':'
exec "$(dirname "${BASH_SOURCE[0]}")/common.sh" 130m "$@"
: ''' #' <<'# end of the Python part'
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_cola.launch import run_rank  # noqa: E402

run_rank("130m")
# end of the Python part
