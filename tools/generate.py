#!/usr/bin/env python3
"""Sample text from a Megatron-CoLA checkpoint directory or a Hugging Face folder.

python tools/generate.py --load PATH --prompt "Once upon a time" [--max-new-tokens 64] [--temperature 0.8]
                         [--top-p 0.95] [--seed 1234] [--greedy] [--iteration N] [--num-samples 1]

PATH is a checkpoint directory (the --save of pretrain_cola.py; exported in memory) or a folder written by
tools/convert_to_hf.py (or any LLaMA folder). Decoding is ``transformers``' ``generate()`` with a KV cache.
"""

import sys

from megatron_cola.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
