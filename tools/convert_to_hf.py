#!/usr/bin/env python3
"""Export a Megatron-CoLA checkpoint as a Hugging Face ``transformers`` folder.

python tools/convert_to_hf.py --load CKPT_DIR --save HF_DIR [--iteration N] [--dtype bf16|fp32]
                              [--max-shard-size 2GB] [--tokenizer-model PATH | --no-tokenizer] [--overwrite]
                              [--from-master | --from-module]

Full-rank models become a native ``LlamaForCausalLM``; CoLA models a ``ColaForCausalLM`` whose code is
written into the folder (``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``).
Any ZeRO stage and tensor-parallel degree: the shards are merged, the vocab padding dropped. The weights
are the fp32 master weights (``optim_tpNN.pt``) when the checkpoint holds them (``--from-master``), else
the model files' (``--from-module``: the module's weights, bf16-rounded in a bf16 run); the tool says which.
"""

import sys

from megatron_cola.cli.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
