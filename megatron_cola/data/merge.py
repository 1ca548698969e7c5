"""Merging Megatron ``.bin/.idx`` datasets in order (the engine of ``tools/merge_datasets.py``).

The result is byte-for-byte the dataset one preprocessing run over the concatenated inputs would have
written; all inputs must share a dtype; the output is written under a temporary name and renamed.
"""

from __future__ import annotations

import os

from megatron_cola.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    commit_dataset,
    data_file_path,
    index_file_path,
    remove_dataset,
)
from megatron_cola.errors import DataError

__all__ = ["merge", "prefixes_in_dir"]


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
    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(out_abs), exist_ok=True)
        builder = MMapIndexedDatasetBuilder(data_file_path(tmp), first.dtype)
    except OSError as exc:
        raise DataError(f"--output-prefix {output_prefix!r}: cannot write there ({exc})") from exc
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(index_file_path(tmp))
        commit_dataset(tmp, output_prefix)
    except OSError as exc:
        builder.abort()
        remove_dataset(tmp)
        raise DataError(f"merging into {output_prefix!r} failed: {exc}; nothing was written") from exc
    except BaseException:
        builder.abort()
        remove_dataset(tmp)
        raise
    return MMapIndexedDataset(output_prefix)
