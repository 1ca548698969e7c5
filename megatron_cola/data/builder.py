"""``build_train_valid_test_datasets``: train/valid/test datasets from Megatron's ``--data-path`` and
``--split``, as Megatron-LM core's ``BlendedMegatronDatasetBuilder`` builds them (single prefix: one
:class:`GPTDataset` per split; weighted prefixes: a :class:`BlendedDataset` per split sized by
:func:`blend_sizes`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from megatron_cola.data.blended_dataset import BlendedDataset, blend_sizes
from megatron_cola.data.gpt_dataset import SPLIT_NAMES, GPTDataset, parse_split, split_ranges
from megatron_cola.data.indexed_dataset import (
    DatasetNotFoundError,
    MMapIndexedDataset,
    data_file_path,
    index_file_path,
)
from megatron_cola.errors import ConfigError

__all__ = ["build_train_valid_test_datasets", "check_data_prefix", "parse_data_path", "similar_prefixes"]


def check_data_prefix(prefix: str) -> None:
    """Raise :class:`DatasetNotFoundError` when ``{prefix}.idx`` or ``{prefix}.bin`` is missing, naming the
    prefix that exists when there is one: ``PREFIX.bin`` given with its extension, the
    ``{prefix}_text_document`` that ``tools/preprocess_data.py`` writes, or datasets beside it whose names
    start with the prefix (``corpus`` -> ``corpus_content_document``). The one check of ``--data-path``
    prefixes (``parse_data_path`` checks the list's shape)."""
    missing = [p for p in (index_file_path(prefix), data_file_path(prefix)) if not os.path.isfile(p)]
    if not missing:
        return
    found = similar_prefixes(prefix)
    if found:
        hint = f"; did you mean {' or '.join(found)}?"
    else:
        hint = (
            "; give the prefix without extension: tools/preprocess_data.py --output-prefix P writes "
            "P_text_document.bin/.idx (one P_KEY_document per --json-keys key)"
        )
    raise DatasetNotFoundError(f"--data-path prefix {prefix!r}: missing {', '.join(missing)}{hint}")


def similar_prefixes(prefix: str, limit: int = 3) -> list[str]:
    """Complete ``.bin/.idx`` prefixes a user probably meant by the missing ``prefix`` (best first)."""

    def complete(p: str) -> bool:
        return os.path.isfile(index_file_path(p)) and os.path.isfile(data_file_path(p))

    for ext in (".bin", ".idx"):
        if prefix.endswith(ext) and complete(prefix[: -len(ext)]):
            return [prefix[: -len(ext)]]
    if complete(prefix + "_text_document"):
        return [prefix + "_text_document"]
    directory, base = os.path.split(prefix)
    try:
        names = sorted(os.listdir(directory or "."))
    except OSError:
        return []
    out = []
    for name in names:
        if name.startswith(base) and name.endswith(".idx"):
            candidate = os.path.join(directory, name[: -len(".idx")])
            if complete(candidate):
                out.append(candidate)
    return out[:limit]


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """Megatron ``--data-path``: ``[PREFIX]`` or ``[W1, P1, W2, P2, ...]`` -> (prefixes, normalized weights
    or None for a single prefix)."""
    items = [data_path] if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise ConfigError("--data-path is empty")
    if len(items) == 1:
        return items, None

    def as_float(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if as_float(items[0]) is None:
        raise ConfigError(
            f"--data-path with several prefixes needs weights: W1 PREFIX1 W2 PREFIX2 ... (got {items})"
        )
    if len(items) % 2:
        raise ConfigError(f"--data-path weight/prefix list has odd length {len(items)}: {items}")
    weights, prefixes = [], []
    for i in range(0, len(items), 2):
        w = as_float(items[i])
        if w is None:
            raise ConfigError(f"--data-path: expected a weight at position {i}, got {items[i]!r}")
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError(f"--data-path: weights must be positive, got {items[i]} for {items[i + 1]!r}")
        weights.append(w)
        prefixes.append(items[i + 1])
    w = np.asarray(weights, dtype=np.float64)
    return prefixes, (w / np.sum(w)).tolist()  # normalized as Megatron's ``normalize`` does


def build_train_valid_test_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    train_valid_test_num_samples: tuple[int, int, int],
    seed: int,
    cache_dir: str | None = None,
    vocab_size: int | None = None,
) -> tuple[
    GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None
]:
    """Train/valid/test datasets from Megatron-style ``--data-path`` and ``--split``.

    A split whose ``--split`` weight or requested sample count is zero is None. With several weighted
    prefixes each split ``n`` is a :class:`BlendedDataset` of ``sum_k ceil(w_k * n)`` samples whose
    component ``k`` is built for ``ceil(ceil(w_k * n) * 1.005)`` samples, as in Megatron-LM core.
    ``vocab_size`` (the tokenizer's, not the padded one) turns on a bound check of every sample's token ids
    (:class:`DataError` naming the file, document and id).
    """
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must have 3 entries")
    requested = [int(n) for n in train_valid_test_num_samples]
    if any(n < 0 for n in requested):
        raise ValueError(f"sample counts must be >= 0, got {requested}")
    split_weights = parse_split(split)
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        check_data_prefix(prefix)
    readers = [MMapIndexedDataset(p) for p in prefixes]

    def one(reader: MMapIndexedDataset, k: int, n: int) -> GPTDataset:
        start, stop = split_ranges(split_weights, len(reader))[k]
        return GPTDataset(
            reader, range(start, stop), seq_length, n, seed, SPLIT_NAMES[k], cache_dir, vocab_size=vocab_size
        )

    out: list[GPTDataset | BlendedDataset | None] = []
    for k, n in enumerate(requested):
        if n == 0 or split_weights[k] == 0:
            out.append(None)
        elif weights is None:
            out.append(one(readers[0], k, n))
        else:
            _, requests, size = blend_sizes(weights, n)
            parts = [one(r, k, m) for r, m in zip(readers, requests)]
            out.append(BlendedDataset(parts, weights, size))
    return out[0], out[1], out[2]
