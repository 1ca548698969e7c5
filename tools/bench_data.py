#!/usr/bin/env python3
"""Data pipeline benchmark: preprocessing throughput and GPT dataset read throughput.

    python tools/bench_data.py                     # sample corpus, workers 1 and 2
    python tools/bench_data.py --workers 1 2 4 --repeats 5 --json bench.json

1. Makes sure the sample corpus exists (``tools/prepare_sample_corpus.py``, ``data/sample``) and a
   SentencePiece tokenizer (``data/tokenizer/sample_32k.model``, trained by ``tools/train_tokenizer.py``;
   8k vocabulary when the corpus cannot fill 32k).
2. Runs ``tools/preprocess_data.py`` (in-process, with ``--append-eod``) for each worker count, best of
   ``--repeats``: documents/s, MB/s, tokens/s, and for ``--workers 1`` the share of the wall time spent
   outside the tokenizer (reading, JSON, numpy conversion, writing).
   With ``--formats jsonl parquet`` the same documents are also written as Parquet (row groups of
   ``--row-group-size`` rows) and each worker count runs on both inputs, alternating, best of
   ``--repeats`` each; the outputs must be byte-identical and the Parquet/JSONL time ratio is printed.
3. Builds a ``GPTDataset`` over the result and reads random samples: index build time and samples/s.
"""

import sys

from megatron_cola.cli.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
