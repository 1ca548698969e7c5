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

from __future__ import annotations

import argparse
import os
import sys

from megatron_cola.data.merge import merge, prefixes_in_dir
from megatron_cola.errors import MegatronColaError

__all__ = ["main", "merge", "prefixes_in_dir"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Merge Megatron .bin/.idx datasets.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--input",
        nargs="+",
        help="dataset prefixes (without .bin/.idx) merged in this order, or one directory",
    )
    src.add_argument("--input-dir", help="merge every .bin/.idx pair in this directory (sorted by name)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    args = p.parse_args(argv)
    try:
        if args.input and len(args.input) == 1 and os.path.isdir(args.input[0]):
            args.input_dir, args.input = args.input[0], None  # Megatron's `--input DIR`
        prefixes = args.input if args.input else prefixes_in_dir(args.input_dir)
        notes: list[str] = []
        ds = merge(prefixes, args.output_prefix, notes)
    except MegatronColaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(note, file=sys.stderr)
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: {len(ds)} sequences, "
        f"{len(ds.document_indices) - 1} documents, {ds.num_tokens} tokens ({ds.dtype.name})"
    )
    return 0
