#!/usr/bin/env python3
"""Training throughput of CoLA vs full rank (and recomputation modes).

    python tools/bench_train.py --model-size 60M --seq-length 256 --micro-batch-size 4 \
        --variants full-rank cola cola:full cola:cola-m [--steps 5 --rounds 3] [--json out.json]

Each variant is ``cola`` or ``full-rank``, optionally with ``:RECOMPUTE``, and optionally ``+grouped``
(q/k/v and gate/up as one GEMM: ``ModelArgs.grouped_projections``), e.g. ``cola:cola-m+grouped``.
``--variants`` takes names separated by spaces or commas (``--variants cola,full-rank``).
``--compile`` compiles each decoder block with ``megatron_cola.model.compile.compile_blocks``, in
``--compile-mode`` (default, reduce-overhead = CUDA graphs, max-autotune, max-autotune-no-cudagraphs).
One step is forward, backward and a fused AdamW update (torch's) of a single micro-batch, under bf16
autocast (``--dtype fp32`` to disable).

Order (``--order``): ``interleaved`` (the default on CPU) builds every variant first and times them in
alternating rounds, so that a busy machine slows them alike; ``sequential`` (the default on CUDA) builds,
times and frees one variant before the next, so each variant's peak memory is its own. On CUDA, peak
memory is reported only where it is the variant's own (``sequential``, or a single variant). One
variant per process, e.g. ``--variants cola:cola-m`` (what benchmarks/gpu_suite.sh runs), isolates
it completely (allocator, compile caches). The table gives the median tokens/s and the ratio to the first
variant; on CUDA also MFU against the card's dense bf16 peak (``--peak-tflops`` to override) and peak
memory (GiB). ``--json`` also records, per variant, the optimizer that ran, the peak used and the device.
"""

import sys

from megatron_cola.cli.bench_train import main

if __name__ == "__main__":
    sys.exit(main())
