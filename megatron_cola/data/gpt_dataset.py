"""GPT pre-training datasets over Megatron ``.bin/.idx`` data, with Megatron-LM's indexing semantics.

:class:`GPTDataset` turns a range of sequences ("documents") of one :class:`MMapIndexedDataset` into
fixed-length samples of ``seq_length + 1`` tokens (inputs and shifted labels share the extra token):

* document index: the split's document ids repeated for as many epochs as the requested sample count
  needs, shuffled with ``numpy.random.RandomState(seed)``; when the last epoch contributes less than 80% of
  an epoch's samples it is shuffled separately (so the tail of the data is not over-represented);
* sample index: :func:`helpers.build_sample_idx` over the concatenated documents;
* shuffle index: a seeded permutation of the samples (the separate last epoch again shuffled apart).

The three arrays are cached as ``.npy`` files under ``cache_dir`` (default ``<prefix dir>/index-cache``),
named by an md5 of the configuration and checked against a digest of the ``.idx`` content
(:mod:`megatron_cola.data.index_cache`); in a ``torch.distributed`` run rank 0 builds them and the other
ranks wait at a barrier and load them. With ``vocab_size`` every sample's token ids are bound-checked.

Blending is in :mod:`megatron_cola.data.blended_dataset`, the train/valid/test builder in
:mod:`megatron_cola.data.builder`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_cola.data import helpers
from megatron_cola.data.index_cache import load_or_build_indices
from megatron_cola.data.indexed_dataset import MMapIndexedDataset, data_file_path
from megatron_cola.data.token_checks import FIX, first_bad_token
from megatron_cola.errors import ConfigError, DataError

__all__ = ["SPLIT_NAMES", "GPTDataset", "parse_split", "split_ranges"]

SPLIT_NAMES = ("train", "valid", "test")
#: Bump when the way indices are built changes, so stale caches are not reused.
INDEX_FORMAT_VERSION = 2
#: Below this fraction of an epoch, the final epoch is shuffled separately (Megatron's threshold).
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


# ---------------------------------------------------------------------------------------------- splits
def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` (or ``"98/2/0"``, ``"1"``) -> normalized train/valid/test weights."""
    if isinstance(split, (list, tuple)):
        parts = [float(x) for x in split]
    else:
        tokens = [t for t in re.split(r"[,/\s]+", str(split).strip()) if t]
        try:
            parts = [float(t) for t in tokens]
        except ValueError:
            raise ConfigError(f"--split {split!r}: expected up to 3 numbers like 969,30,1") from None
    if not parts or len(parts) > 3:
        raise ConfigError(f"--split {split!r}: expected 1 to 3 numbers like 969,30,1")
    if any(p < 0 or not math.isfinite(p) for p in parts):
        raise ConfigError(f"--split {split!r}: weights must be finite and non-negative")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if total <= 0:
        raise ConfigError(f"--split {split!r}: at least one weight must be positive")
    return [p / total for p in parts]


def split_ranges(split: str | Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Document ranges ``[(start, stop)] * 3`` for train/valid/test, as Megatron-LM core cuts them: the
    normalized weights are accumulated and each boundary is ``round(cumulative_fraction * n)``."""
    weights = parse_split(split) if isinstance(split, str) else parse_split(list(split))
    cumulative = [0.0]
    for w in weights:
        cumulative.append(cumulative[-1] + w)
    bounds = [min(int(round(c * float(num_documents))), num_documents) for c in cumulative]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


# ---------------------------------------------------------------------------------------------- GPT dataset
def _build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool
) -> np.ndarray:
    if not separate_last_epoch or num_epochs == 1:
        index = np.tile(documents.astype(np.int32), num_epochs)
        rng.shuffle(index)
        return index
    first = _build_document_index(documents, num_epochs - 1, rng, False)
    last = _build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def _build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTDataset:
    """Fixed-length token windows over documents ``documents`` of ``indexed_dataset``.

    ``ds[i]`` is ``{"text": int64 array of seq_length + 1 tokens}``. ``len(ds)`` is at least ``num_samples``
    (whole epochs are indexed; ``num_samples=None`` means one epoch). Map-style, usable by a torch
    ``DataLoader`` directly.
    """

    def __init__(
        self,
        indexed_dataset: MMapIndexedDataset | str,
        documents: np.ndarray | range | tuple[int, int],
        seq_length: int,
        num_samples: int | None,
        seed: int,
        name: str = "train",
        cache_dir: str | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if isinstance(indexed_dataset, str):
            indexed_dataset = MMapIndexedDataset(indexed_dataset)
        self.indexed_dataset = indexed_dataset
        if isinstance(documents, tuple):
            documents = range(*documents)
        self.documents = np.asarray(documents, dtype=np.int64)
        self.seq_length = int(seq_length)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = int(seed)
        self.name = name
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        prefix = indexed_dataset.path_prefix
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if self.documents.size == 0:
            raise DataError(
                f"{prefix}: the {name} split has no documents; give it a larger share in --split or more data"
            )
        n_seq = len(indexed_dataset)
        if self.documents.min() < 0 or self.documents.max() >= n_seq:
            raise DataError(f"{prefix}: document ids outside [0, {n_seq})")
        self.tokens_per_epoch = int(indexed_dataset.sequence_lengths[self.documents].sum(dtype=np.int64))
        if self.tokens_per_epoch < 2:
            raise DataError(
                f"{prefix}: the {name} split has {self.tokens_per_epoch} tokens, too few for a sample"
            )

        self.cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
        config = self._describe()
        self.unique_hash = hashlib.md5(config.encode("utf-8")).hexdigest()
        # The cache file names follow the configuration; the description also pins the .idx content, so
        # an entry left by an earlier version of the same dataset is detected as stale and rebuilt.
        content = {"index_sha1": indexed_dataset.index_digest, **json.loads(config)}
        self.description = json.dumps(content, indent=2, sort_keys=True)
        arrays, self.built_indices = load_or_build_indices(
            self.cache_dir,
            f"{self.unique_hash}-{type(self).__name__}-{name}",
            self.description,
            ("document_index", "sample_index", "shuffle_index"),
            self._build_indices,
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _describe(self) -> str:
        docs = self.documents
        if docs.size and np.array_equal(docs, np.arange(docs[0], docs[0] + docs.size)):
            doc_desc: Any = [int(docs[0]), int(docs[0] + docs.size)]
        else:
            doc_desc = hashlib.md5(docs.tobytes()).hexdigest()
        prefix = os.path.abspath(self.indexed_dataset.path_prefix)
        return json.dumps(
            {
                "class": type(self).__name__,
                "format_version": INDEX_FORMAT_VERSION,
                "path_prefix": prefix,
                "data_bytes": os.path.getsize(data_file_path(prefix)),
                "num_sequences": len(self.indexed_dataset),
                "documents": doc_desc,
                "split": self.name,
                "seq_length": self.seq_length,
                "num_samples": self.num_samples,
                "seed": self.seed,
                "add_extra_token_to_sequence": 1,
            },
            indent=2,
            sort_keys=True,
        )

    def _num_epochs(self) -> int:
        if self.num_samples is None:
            return 1
        needed = self.num_samples * self.seq_length + 1
        return max(1, -(-needed // self.tokens_per_epoch))

    def _build_indices(self) -> dict[str, np.ndarray]:
        num_epochs = self._num_epochs()
        separate_last = False
        samples_before_last = 0
        if num_epochs > 1 and self.num_samples is not None:
            samples_before_last = ((num_epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length
            from_last = self.num_samples - samples_before_last
            per_epoch = (self.tokens_per_epoch - 1) // self.seq_length
            separate_last = from_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * per_epoch)
        rng = np.random.RandomState(self.seed)
        document_index = _build_document_index(self.documents, num_epochs, rng, separate_last)
        sample_index = helpers.build_sample_idx(
            self.indexed_dataset.sequence_lengths,
            document_index,
            self.seq_length,
            num_epochs,
            self.tokens_per_epoch,
        )
        total = sample_index.shape[0] - 1
        shuffle_index = _build_shuffle_index(samples_before_last if separate_last else total, total, rng)
        return {
            "document_index": document_index,
            "sample_index": sample_index,
            "shuffle_index": shuffle_index,
        }

    def __len__(self) -> int:
        return int(self.shuffle_index.shape[0])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        n = len(self)
        i = int(idx)
        if not 0 <= i < n:
            raise IndexError(f"sample {idx} out of range for {self.name} dataset of {n} samples")
        j = int(self.shuffle_index[i])
        doc_beg, off_beg = (int(x) for x in self.sample_index[j])
        doc_end, off_end = (int(x) for x in self.sample_index[j + 1])
        get = self.indexed_dataset.get
        if doc_beg == doc_end:
            parts = [get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + 1)]
        else:
            parts = [get(int(self.document_index[doc_beg]), off_beg)]
            for k in range(doc_beg + 1, doc_end):
                parts.append(get(int(self.document_index[k])))
            parts.append(get(int(self.document_index[doc_end]), 0, off_end + 1))
        tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.vocab_size is not None:
            pos = first_bad_token(tokens, self.vocab_size)
            if pos is not None:
                self._bad_token(i, doc_beg, off_beg, parts, pos)
        return {"text": tokens.astype(np.int64)}

    def _bad_token(self, i: int, doc_beg: int, off_beg: int, parts: list[np.ndarray], pos: int) -> None:
        """Raise the DataError for the id at ``pos`` of sample ``i`` (made of ``parts``)."""
        ends = np.cumsum([p.size for p in parts])
        k = int(np.searchsorted(ends, pos, side="right"))
        seq = int(self.document_index[doc_beg + k])
        offset = pos - (int(ends[k - 1]) if k else 0) + (off_beg if k == 0 else 0)
        doc = int(np.searchsorted(self.indexed_dataset.document_indices, seq, side="right")) - 1
        value = int(parts[k][pos - (int(ends[k - 1]) if k else 0)])
        raise DataError(
            f"{data_file_path(self.indexed_dataset.path_prefix)}: token id {value} in document {doc} "
            f"(sequence {seq}, token {offset}; sample {i} of the {self.name} split) is outside the "
            f"tokenizer's vocabulary [0, {self.vocab_size}); {FIX}"
        )

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.indexed_dataset.path_prefix!r}, split={self.name}, "
            f"documents={self.documents.size}, "
            f"seq_length={self.seq_length}, samples={len(self)})"
        )
