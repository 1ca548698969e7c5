#!/usr/bin/env python3
"""Tensor-parallel communication per token per block: the CoLA schemes vs Megatron's dense TP.

    python tools/comm_bytes.py --model-size 1B 7B --tp 2 4 8 [--cola-tp-scheme all] [--json FILE]
    python tools/comm_bytes.py --measure          # CommCounter on real TP ranks (gloo) next to analytic

See megatron_cola/cli/comm_bytes.py for every flag, megatron_cola/parallel/comm.py for the model.
"""

import sys

from megatron_cola.cli.comm_bytes import main

if __name__ == "__main__":
    sys.exit(main())
