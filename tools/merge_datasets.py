#!/usr/bin/env python3
"""Merge several Megatron ``.bin/.idx`` datasets into one (in the order given).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input-dir data/shards --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards --output-prefix data/all  # Megatron style

Writes ``{output-prefix}.bin/.idx``; the result is byte-for-byte the dataset a single preprocessing run
over the concatenated inputs would have written. All inputs must share a dtype. The output is written under
a temporary name and renamed when complete. Inputs whose tokenizer records (``PREFIX.meta.json``) name
different tokenizers are refused; the output gets a record when every input has one.
"""

import sys

from megatron_cola.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())
