#!/usr/bin/env python3
"""Loss curves of several runs in one PNG, against tokens, training FLOPs or training hours, and a table.

    python tools/plot_runs.py --run CoLA=runs/cola --run "full rank=runs/full" --x tokens --x flops \
        --output loss.png [--table table.md]

Each run is a launcher's ``--save`` directory (its ``tensorboard/metrics.jsonl`` is read) or a
``--tensorboard-dir``, given as ``LABEL=DIR`` or just ``DIR``. See ``megatron_cola/cli/plot_runs.py``.
"""

import sys

from megatron_cola.cli.plot_runs import main

if __name__ == "__main__":
    sys.exit(main())
