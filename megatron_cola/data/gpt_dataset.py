"""GPT pre-training datasets over Megatron ``.bin/.idx`` data, with Megatron-LM's indexing semantics.

:class:`GPTDataset` turns a range of sequences ("documents") of one :class:`MMapIndexedDataset` into
fixed-length samples of ``seq_length + 1`` tokens (inputs and shifted labels share the extra token):

* document index: the split's document ids repeated for as many epochs as the requested sample count
  needs, shuffled with ``numpy.random.RandomState(seed)``; when the last epoch contributes less than 80% of
  an epoch's samples it is shuffled separately (so the tail of the data is not over-represented);
* sample index: :func:`helpers.build_sample_idx` over the concatenated documents;
* shuffle index: a seeded permutation of the samples (the separate last epoch again shuffled apart).

The three arrays are cached as ``.npy`` files under ``cache_dir`` (default ``<prefix dir>/index-cache``),
named by an md5 of everything that defines them, written atomically; in a ``torch.distributed`` run rank 0
builds them and the other ranks wait at a barrier and load them.

:class:`BlendedDataset` interleaves datasets by weight with :func:`helpers.build_blending_indices`, and
:func:`build_train_valid_test_datasets` builds the three splits from Megatron-style ``--data-path`` and
``--split`` arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from megatron_cola.atomic_io import atomic_open, atomic_write_text
from megatron_cola.data import helpers
from megatron_cola.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path

__all__ = [
    "SPLIT_NAMES",
    "BlendedDataset",
    "GPTDataset",
    "build_train_valid_test_datasets",
    "parse_data_path",
    "parse_split",
    "split_ranges",
]

SPLIT_NAMES = ("train", "valid", "test")
#: Bump when the way indices are built changes, so stale caches are not reused.
INDEX_FORMAT_VERSION = 1
#: Below this fraction of an epoch, the final epoch is shuffled separately (Megatron's threshold).
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80
#: Each blended component is asked for this much more than its weighted share (Megatron's 0.5% margin).
BLEND_MARGIN = 1.005


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
            raise ValueError(f"--split {split!r}: expected up to 3 numbers like 969,30,1") from None
    if not parts or len(parts) > 3:
        raise ValueError(f"--split {split!r}: expected 1 to 3 numbers like 969,30,1")
    if any(p < 0 or not math.isfinite(p) for p in parts):
        raise ValueError(f"--split {split!r}: weights must be finite and non-negative")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if total <= 0:
        raise ValueError(f"--split {split!r}: at least one weight must be positive")
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


# ---------------------------------------------------------------------------------------------- caching
def _distributed() -> Any | None:
    """``torch.distributed`` when a process group is initialized, else None. torch is not imported here:
    if nothing imported it, no process group can exist (and importing it would cost a second)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _atomic_save(path: str, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_or_build_indices(
    cache_dir: str,
    base: str,
    description: str,
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], bool]:
    """Return the arrays ``names`` from ``cache_dir/{base}-{name}.npy``, building and saving them first when
    missing (rank 0 only in a distributed run; the others wait at a barrier, then load). The description
    file is written last and marks the set complete. Returns ``(arrays, built_here)``.

    Never fatal: when the cache cannot be written the indices stay in memory, and a rank that does not
    find rank 0's files (cache directory not shared between nodes) builds the same indices itself.
    """
    paths = {name: os.path.join(cache_dir, f"{base}-{name}.npy") for name in names}
    desc_path = os.path.join(cache_dir, f"{base}-description.json")

    def complete() -> bool:
        if not all(os.path.isfile(p) for p in paths.values()) or not os.path.isfile(desc_path):
            return False
        with open(desc_path, encoding="utf-8") as f:
            return f.read() == description

    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0
    arrays: dict[str, np.ndarray] | None = None
    if rank == 0 and not complete():
        arrays = build()
        try:
            os.makedirs(cache_dir, exist_ok=True)
            for name in names:
                _atomic_save(paths[name], arrays[name])
            atomic_write_text(desc_path, description)
        except OSError as exc:
            warnings.warn(
                f"could not write the dataset index cache in {cache_dir} ({exc}); keeping it in memory",
                stacklevel=2,
            )
    if dist is not None:
        dist.barrier()
    if arrays is not None:
        return arrays, True
    if not complete():
        warnings.warn(
            f"rank {rank}: dataset index cache {desc_path} not found after rank 0 built it (cache directory "
            "not shared by all ranks?); building the same indices on this rank",
            stacklevel=2,
        )
        return build(), True
    return {name: np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names}, False


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
        prefix = indexed_dataset.path_prefix
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        if self.num_samples is not None and self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if self.documents.size == 0:
            raise ValueError(
                f"{prefix}: the {name} split has no documents; give it a larger share in --split or more data"
            )
        n_seq = len(indexed_dataset)
        if self.documents.min() < 0 or self.documents.max() >= n_seq:
            raise ValueError(f"{prefix}: document ids outside [0, {n_seq})")
        self.tokens_per_epoch = int(indexed_dataset.sequence_lengths[self.documents].sum(dtype=np.int64))
        if self.tokens_per_epoch < 2:
            raise ValueError(
                f"{prefix}: the {name} split has {self.tokens_per_epoch} tokens, too few for a sample"
            )

        self.cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
        self.description = self._describe()
        self.unique_hash = hashlib.md5(self.description.encode("utf-8")).hexdigest()
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
                "index_bytes": os.path.getsize(index_file_path(prefix)),
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
            tokens = get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + 1)
            return {"text": tokens.astype(np.int64)}
        parts = [get(int(self.document_index[doc_beg]), off_beg)]
        for k in range(doc_beg + 1, doc_end):
            parts.append(get(int(self.document_index[k])))
        parts.append(get(int(self.document_index[doc_end]), 0, off_end + 1))
        return {"text": np.concatenate(parts).astype(np.int64, copy=False)}

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.indexed_dataset.path_prefix!r}, split={self.name}, "
            f"documents={self.documents.size}, "
            f"seq_length={self.seq_length}, samples={len(self)})"
        )


# ---------------------------------------------------------------------------------------------- blending
class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalized), in the
    deterministic greedy order of :func:`helpers.build_blending_indices`. ``ds[i]`` is the component's
    sample; ``dataset_index[i]`` / ``dataset_sample_index[i]`` say where it came from."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int) -> None:
        if len(datasets) == 0:
            raise ValueError("BlendedDataset needs at least one dataset")
        if len(weights) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        index_dtype = np.uint8 if len(datasets) <= 256 else np.int16
        self.dataset_index = np.zeros(self.size, dtype=index_dtype)
        self.dataset_sample_index = np.zeros(self.size, dtype=np.int64)
        helpers.build_blending_indices(
            self.dataset_index, self.dataset_sample_index, self.weights, len(datasets), self.size
        )
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (count, ds) in enumerate(zip(counts, self.datasets)):
            if count > len(ds):
                raise ValueError(
                    f"blended dataset {d} ({ds!r}) has {len(ds)} samples but the blend needs {count}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        i = int(idx)
        if not 0 <= i < self.size:
            raise IndexError(f"sample {idx} out of range for blended dataset of {self.size} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        return f"BlendedDataset({len(self.datasets)} datasets, weights=[{weights}], size={self.size})"


# ---------------------------------------------------------------------------------------------- builder
def _check_prefix(prefix: str) -> None:
    missing = [p for p in (index_file_path(prefix), data_file_path(prefix)) if not os.path.isfile(p)]
    if not missing:
        return
    hint = ""
    if os.path.isfile(index_file_path(prefix + "_text_document")):
        hint = f" (did you mean {prefix}_text_document?)"
    raise FileNotFoundError(f"data prefix {prefix!r}: missing {', '.join(missing)}{hint}")


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """Megatron ``--data-path``: ``[PREFIX]`` or ``[W1, P1, W2, P2, ...]`` -> (prefixes, normalized weights
    or None for a single prefix)."""
    items = [data_path] if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise ValueError("--data-path is empty")
    if len(items) == 1:
        return items, None

    def as_float(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    if as_float(items[0]) is None:
        raise ValueError(
            f"--data-path with several prefixes needs weights: W1 PREFIX1 W2 PREFIX2 ... (got {items})"
        )
    if len(items) % 2:
        raise ValueError(f"--data-path weight/prefix list has odd length {len(items)}: {items}")
    weights, prefixes = [], []
    for i in range(0, len(items), 2):
        w = as_float(items[i])
        if w is None:
            raise ValueError(f"--data-path: expected a weight at position {i}, got {items[i]!r}")
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"--data-path: weights must be positive, got {items[i]} for {items[i + 1]!r}")
        weights.append(w)
        prefixes.append(items[i + 1])
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def build_train_valid_test_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    train_valid_test_num_samples: tuple[int, int, int],
    seed: int,
    cache_dir: str | None = None,
) -> tuple[
    GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None, GPTDataset | BlendedDataset | None
]:
    """Train/valid/test datasets from Megatron-style ``--data-path`` and ``--split``.

    A split whose ``--split`` weight or requested sample count is zero is None. With several weighted
    prefixes each split is a :class:`BlendedDataset` of exactly the requested size whose component ``k`` is
    asked for ``ceil(weight_k * n * 1.005)`` samples.
    """
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must have 3 entries")
    requested = [int(n) for n in train_valid_test_num_samples]
    if any(n < 0 for n in requested):
        raise ValueError(f"sample counts must be >= 0, got {requested}")
    split_weights = parse_split(split)
    prefixes, weights = parse_data_path(data_path)
    for prefix in prefixes:
        _check_prefix(prefix)
    readers = [MMapIndexedDataset(p) for p in prefixes]

    def one(reader: MMapIndexedDataset, k: int, n: int) -> GPTDataset:
        start, stop = split_ranges(split_weights, len(reader))[k]
        return GPTDataset(reader, range(start, stop), seq_length, n, seed, SPLIT_NAMES[k], cache_dir)

    out: list[GPTDataset | BlendedDataset | None] = []
    for k, n in enumerate(requested):
        if n == 0 or split_weights[k] == 0:
            out.append(None)
        elif weights is None:
            out.append(one(readers[0], k, n))
        else:
            parts = [one(r, k, int(math.ceil(w * n * BLEND_MARGIN))) for r, w in zip(readers, weights)]
            out.append(BlendedDataset(parts, weights, n))
    return out[0], out[1], out[2]
