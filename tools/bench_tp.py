#!/usr/bin/env python3
"""CPU step time of the tensor-parallel schemes (split-rank, bottleneck) on 2 and 4 gloo processes, one run.

    python tools/bench_tp.py --model-size 60M --nproc 2 4 --steps 1 --rounds 12 [--json FILE]

See megatron_cola/cli/bench_tp.py for every flag.
"""

import sys

from megatron_cola.cli.bench_tp import main

if __name__ == "__main__":
    sys.exit(main())
