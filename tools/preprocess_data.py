#!/usr/bin/env python3
"""Tokenize JSONL / Parquet documents into Megatron ``.bin/.idx`` datasets (Megatron-LM's flags and output).

    python tools/preprocess_data.py --input data/sample/train.jsonl --output-prefix data/sample/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample_32k.model \\
        --append-eod --workers 2

Writes ``{output-prefix}_{key}_document.bin/.idx`` for every ``--json-keys`` key, MMIDIDX v1, uint16 tokens
when the vocabulary is below 65500 else int32, byte-for-byte what Megatron-LM's builder writes for the same
ids, and beside each its tokenizer record ``.meta.json`` (checked at training start-up). ``--input`` takes
``.jsonl``/``.jsonl.gz`` files (one JSON object per line), ``.parquet`` and ``.arrow`` files (read with
pyarrow a row group at a time; ``--json-keys`` names the columns), Hugging Face ``datasets``
``save_to_disk`` directories, and globs; a Parquet row gives the bytes the JSONL line with the same string
gives.

* Bad lines (not UTF-8, not JSON, not an object, a key missing or not a string, tokenizer error) are
  reported as ``file:line: reason``, skipped and counted; ``--strict`` makes the first one fatal (exit 1).
* Documents that tokenize to nothing are recorded as Megatron records them (a document with no sequence,
  no EOD) and counted; a run that yields no tokens at all is an error unless ``--allow-empty``.
* ``--workers N`` tokenizes in N processes (``--workers 1`` runs in-process); order is always the input
  order, so the output does not depend on the worker count.
* ``--partitions P`` runs P parallel processes with ``workers // P`` workers each and writes their parts
  one after another. As in Megatron-LM, records are dealt out in turn (record i to part i % P), so P=2
  writes the even records, then the odd ones; ``--keep-sequential-samples`` cuts the input into
  contiguous parts instead, giving the P=1 bytes.
* Outputs are written under temporary names and renamed when complete (``.idx`` last), so an interrupted
  run never leaves a pair that looks valid; Ctrl-C and SIGTERM remove the temporaries.

The engine is :mod:`megatron_cola.data.preprocess`; this file is its command line.

Without ``--split-sentences`` (not supported here, as in Megatron's default GPT path) every document is
tokenized whole, newlines included; ``--keep-newlines`` is accepted for command-line compatibility.
"""

import sys

from megatron_cola.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
