#!/usr/bin/env python3
"""Import a Hugging Face folder as a Megatron-CoLA checkpoint that ``pretrain_cola.py --load`` continues from.

python tools/convert_from_hf.py --load HF_DIR --save CKPT_DIR [--tokenizer-model PATH] [--dtype fp32|bf16]
                                [--overwrite]

Understood: ``LlamaForCausalLM`` folders (-> the full-rank model), Megatron-CoLA ``ColaForCausalLM`` exports
(-> CoLA) and the CoLA authors' ``ColaForCausalLM`` and CoLA-M ``ColaMForCausalLM`` (``model_type: cola``;
``cola_a``/``cola_b`` tensors; σ and the gate activation from ``hidden_act``, as their models do).
Writes ``CKPT_DIR/iter_0000000/model_tp00.pt`` (tensor-parallel size 1) and ``CKPT_DIR/latest``; the
tokenizer (the folder's, or --tokenizer-model) is copied to ``CKPT_DIR/tokenizer``.
"""

import sys

from megatron_cola.cli.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
