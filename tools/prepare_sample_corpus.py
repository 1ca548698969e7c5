#!/usr/bin/env python3
"""Build the bundled sample corpus (Shakespeare) as JSONL: ``train.jsonl`` and ``valid.jsonl``.

How the corpus is cut and split: ``megatron_cola/data/sample_corpus.py``, the engine of this tool.

    python tools/prepare_sample_corpus.py --output-dir data/sample
"""

import sys

from megatron_cola.cli.prepare_sample_corpus import main

if __name__ == "__main__":
    sys.exit(main())
