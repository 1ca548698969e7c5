#!/usr/bin/env python3
"""Generation throughput and peak memory of CoLA vs full rank at the same size, prompt length and batch.

python tools/bench_inference.py [--model-size 60M] [--batch-size 8] [--prompt-length 128] [--new-tokens 128]
                                [--dtype fp32|bf16] [--device cpu|cuda] [--variants cola,full,llama]
                                [--repeats 3] [--rounds 1] [--threads N] [--json]

Each variant runs in its own subprocess (random init is fine: only shapes matter) and reports
- ``generate tok/s``: new tokens per second of ``generate()`` (greedy, KV cache, prefill included),
  median of ``--repeats`` calls after a warm-up (with ``--rounds N`` each variant runs N times,
  alternating with the others, keeping the best figures: meant to damp a busy machine's noise);
- ``prefill ms``: one forward over the prompt batch (last-position logits only, as in ``generate()``);
- ``peak MiB``: CPU, the process's peak RSS at the end (``getrusage`` ``ru_maxrss``) minus its RSS just
  before the model is built, so weights + KV cache + activations + allocator slack (PyTorch
  allocations are invisible to ``tracemalloc``); CUDA, ``torch.cuda.max_memory_allocated``.

Variants: ``cola`` and ``full`` both run Megatron-CoLA's ``ColaForCausalLM`` (``cola_rank=None`` gives
dense maps), so they share every line of code but the linear maps; ``llama`` is ``transformers``'
``LlamaForCausalLM`` at the full-rank shapes, for reference.
"""

import sys

from megatron_cola.cli.bench_inference import main

if __name__ == "__main__":
    sys.exit(main())
