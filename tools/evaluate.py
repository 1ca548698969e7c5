#!/usr/bin/env python3
"""Evaluate a checkpoint or a Hugging Face folder with lm-evaluation-harness and write the results as JSON.

python tools/evaluate.py --load DIR --tasks NAMES [--include-path DIR] [--output FILE.json]

DIR is a checkpoint directory (exported to a temporary HF folder) or an HF folder; ``--tasks sample_cloze``
(bundled, offline) needs no other setup. See ``megatron_cola/cli/evaluate.py`` for every flag.
"""

import sys

from megatron_cola.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
