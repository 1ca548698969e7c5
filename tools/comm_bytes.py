#!/usr/bin/env python3
"""Tensor-parallel communication per token per block: CoLA TP vs Megatron's dense TP (analytic).

    python tools/comm_bytes.py --model-size 7B --tp 2 4 8
    python tools/comm_bytes.py --model-size 1B 7B --tp 2 4 8 --dtype fp32 --recompute cola-m

Bytes are what each rank sends under the ring algorithm (all-reduce 2(t-1)/t·n, all-gather and
reduce-scatter (t-1)/t·n), forward + backward; see megatron_cola/parallel/comm.py and
docs/tensor_parallel.md. ``CommCounter`` measures the same numbers on a real run.
"""

import sys

from megatron_cola.cli.comm_bytes import main

if __name__ == "__main__":
    sys.exit(main())
