"""Merging Megatron ``.bin/.idx`` datasets in order (the engine of ``tools/merge_datasets.py``).

The result is byte-for-byte the dataset one preprocessing run over the concatenated inputs would have
written; all inputs must share a dtype; the output is written under a temporary name and renamed.

Tokenizer records (``{prefix}.meta.json``, :mod:`megatron_cola.data.sidecar`): inputs whose records name
different tokenizers are refused. When every input has a record, the output gets one (the common tokenizer,
each input's preprocessing flags under ``merged_from``); when some have none, the output gets none and
:func:`merge` returns a note saying which.
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
from megatron_cola.data.sidecar import (
    TokenizerRecord,
    dataset_record,
    describes,
    read_sidecar,
    recorded_tokenizer,
    sidecar_path,
    write_sidecar,
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


def _input_records(prefixes: list[str]) -> tuple[list[dict | None], list[str]]:
    """Each input's record (``None``: none, or a stale one) and the notes about the ones missing; raises
    :class:`DataError` when two records name different tokenizers."""
    records: list[dict | None] = []
    notes: list[str] = []
    first: tuple[str, TokenizerRecord] | None = None
    for p in prefixes:
        record = read_sidecar(p)
        if record is not None and not describes(p, record):
            notes.append(f"note: {sidecar_path(p)} describes other .bin/.idx contents; ignored")
            record = None
        records.append(record)
        if record is None:
            continue
        tok = recorded_tokenizer(p, record)
        if first is None:
            first = (p, tok)
        elif tok.differences(first[1]):
            raise DataError(
                f"{p} was tokenized with {tok.describe()} but {first[0]} with {first[1].describe()} "
                f"(records {sidecar_path(p)}, {sidecar_path(first[0])}); datasets made with different "
                "tokenizers cannot be merged"
            )
    missing = [p for p, r in zip(prefixes, records) if r is None]
    if missing and len(missing) < len(prefixes):
        notes.append(
            f"note: no tokenizer record for {', '.join(missing)}: the merged dataset gets none "
            "(a record is written only when every input has one)"
        )
    return records, notes


def merge(prefixes: list[str], output_prefix: str, notes: list[str] | None = None) -> MMapIndexedDataset:
    """Concatenate ``prefixes`` into ``output_prefix``; returns the merged dataset.

    The inputs' tokenizer records are checked after their dtypes (different tokenizers:
    :class:`DataError`); the output gets a record when every input has one. Notes about missing records
    are appended to ``notes``."""
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
    records, record_notes = _input_records(prefixes)
    if notes is not None:
        notes.extend(record_notes)
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
        complete = [r for r in records if r is not None]
        if len(complete) == len(prefixes):
            merged_from = [
                {"prefix": p, "preprocess": r.get("preprocess")} for p, r in zip(prefixes, complete)
            ]
            flags = {"tool": "tools/merge_datasets.py", "merged_from": merged_from}
            tok = recorded_tokenizer(prefixes[0], complete[0])
            write_sidecar(output_prefix, dataset_record(tmp, tok, first.dtype.name, flags))
        elif os.path.isfile(sidecar_path(output_prefix)):
            os.remove(sidecar_path(output_prefix))  # an old output's record would not describe this one
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
