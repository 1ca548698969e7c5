#!/usr/bin/env python
"""Merge several Megatron ``.bin/.idx`` datasets into one (in the order given).

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
    python tools/merge_datasets.py --input-dir data/shards --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards --output-prefix data/all  # Megatron style

Writes ``{output-prefix}.bin/.idx``; the result is byte-for-byte the dataset a single preprocessing run
over the concatenated inputs would have written. All inputs must share a dtype. The output is written under
a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_cola.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    commit_dataset,
    data_file_path,
    index_file_path,
    remove_dataset,
)
from megatron_cola.errors import DataError, MegatronColaError


def prefixes_in_dir(directory: str) -> list[str]:
    """Sorted prefixes of the complete ``.bin/.idx`` pairs in ``directory``."""
    if not os.path.isdir(directory):
        raise DataError(f"--input-dir {directory!r}: not a directory")
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".idx"):
            prefix = os.path.join(directory, name[: -len(".idx")])
            if os.path.isfile(data_file_path(prefix)):
                out.append(prefix)
    if not out:
        raise DataError(f"--input-dir {directory!r}: no .bin/.idx pairs found")
    return out


def merge(prefixes: list[str], output_prefix: str) -> MMapIndexedDataset:
    """Concatenate ``prefixes`` into ``output_prefix``; returns the merged dataset."""
    if not prefixes:
        raise DataError("nothing to merge")
    out_abs = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out_abs for p in prefixes):
        raise DataError(f"output prefix {output_prefix!r} is also an input")
    first = MMapIndexedDataset(prefixes[0])
    for p in prefixes[1:]:
        other = MMapIndexedDataset(p)
        if other.dtype != first.dtype:
            raise IndexedDatasetError(
                f"{index_file_path(p)} holds {other.dtype.name} tokens but "
                f"{index_file_path(prefixes[0])} holds {first.dtype.name}; "
                "datasets with different dtypes cannot be merged"
            )
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    builder = MMapIndexedDatasetBuilder(data_file_path(tmp), first.dtype)
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(index_file_path(tmp))
        commit_dataset(tmp, output_prefix)
    except BaseException:
        builder.abort()
        remove_dataset(tmp)
        raise
    return MMapIndexedDataset(output_prefix)


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
        ds = merge(prefixes, args.output_prefix)
    except (MegatronColaError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"merged {len(prefixes)} datasets into {args.output_prefix}: {len(ds)} sequences, "
        f"{len(ds.document_indices) - 1} documents, {ds.num_tokens} tokens ({ds.dtype.name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
