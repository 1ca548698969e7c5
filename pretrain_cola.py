#!/usr/bin/env python3
"""Pre-train a CoLA (or full-rank LLaMA) model with DeepSpeed; Megatron-LM's flags.

    deepspeed --num_gpus 8 pretrain_cola.py --model-size 1B --bf16 --data-path ... --tokenizer-model ...
    torchrun --nproc_per_node 2 pretrain_cola.py ...      # also: mpirun -np N, srun, or a single process

See ``python pretrain_cola.py --help`` and examples/.
"""

import sys

from megatron_cola.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
