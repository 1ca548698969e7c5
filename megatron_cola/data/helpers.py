"""Sample-index and blending-index builders: the C++ extension when built, else a fallback.

The sample-index fallback is vectorised numpy; the blending fallback is a pure-Python loop over the samples
(each step depends on the previous one), about 1 µs per sample and dataset.

Both functions follow Megatron-LM core's ``helpers.cpp`` semantics and the two backends produce identical
arrays (tests/test_data_helpers.py checks this on random inputs). ``megatron_cola.data._helpers`` is built
from ``csrc/helpers.cpp`` by ``setup.py`` (``pip install -e .`` or ``python setup.py build_ext --inplace``);
without it the fallback is used and one warning says so.
"""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt

try:  # pragma: no cover - depends on the build
    from megatron_cola.data import _helpers as _cpp
except ImportError:  # pragma: no cover
    _cpp = None

__all__ = [
    "HAVE_CPP_HELPERS",
    "build_blending_indices",
    "build_blending_indices_python",
    "build_sample_idx",
    "build_sample_idx_numpy",
]

HAVE_CPP_HELPERS: bool = _cpp is not None
_INT32_MAX = int(np.iinfo(np.int32).max)
_warned = False


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "megatron_cola.data._helpers (C++ extension) is not built; using the slower numpy / pure-Python "
            "fallback for dataset index building. Build it with `pip install -e .` or "
            "`python setup.py build_ext --inplace` (needs a C++17 compiler and pybind11).",
            RuntimeWarning,
            stacklevel=3,
        )


def _sample_idx_dtype(sizes: np.ndarray, document_index: np.ndarray) -> type[np.generic]:
    largest = max(int(document_index.shape[0]), int(sizes.max()) if sizes.size else 0)
    return np.int32 if largest <= _INT32_MAX else np.int64


def _num_samples(
    seq_length: int, num_epochs: int, tokens_per_epoch: int, drop_last: bool, add_extra_token: int
) -> int:
    usable = num_epochs * tokens_per_epoch - add_extra_token
    if usable <= 0:
        return 0
    return usable // seq_length if drop_last else -(-usable // seq_length)


def _check_sample_args(seq_length: int, num_epochs: int, tokens_per_epoch: int, add_extra_token: int) -> None:
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    if tokens_per_epoch < 1:
        raise ValueError(f"tokens_per_epoch must be >= 1, got {tokens_per_epoch}")
    if add_extra_token not in (0, 1):
        raise ValueError(f"add_extra_token_to_sequence must be 0 or 1, got {add_extra_token}")


def build_sample_idx_numpy(
    sizes: npt.ArrayLike,
    document_index: npt.ArrayLike,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
    dtype: npt.DTypeLike | None = None,
) -> np.ndarray:
    """Vectorised reference for :func:`build_sample_idx` (same output, ``dtype`` forced when given).

    Sample ``s`` starts at global token position ``s * seq_length`` of the documents concatenated in
    ``document_index`` order. Row ``s`` holds the position in ``document_index`` of the document containing
    that token and the offset inside it (with ``add_extra_token_to_sequence=0`` a boundary that falls at a
    document end is recorded as that document's end). Row 0 is ``(0, 0)``. A partial last sample that runs
    past the data (``drop_last_partial_sequence=False``) ends at the last document's final token.
    """
    extra = int(add_extra_token_to_sequence)
    _check_sample_args(seq_length, num_epochs, tokens_per_epoch, extra)
    sizes = np.asarray(sizes, dtype=np.int32)
    docs = np.asarray(document_index, dtype=np.int32)
    if docs.ndim != 1 or sizes.ndim != 1:
        raise ValueError("sizes and document_index must be 1-D")
    if docs.size == 0:
        raise ValueError("build_sample_idx: empty document_index")
    if docs.min() < 0 or docs.max() >= sizes.size:
        raise ValueError(f"build_sample_idx: document ids out of range for {sizes.size} sizes")
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(_sample_idx_dtype(sizes, docs))
    num_samples = _num_samples(seq_length, num_epochs, tokens_per_epoch, drop_last_partial_sequence, extra)

    doc_sizes = sizes[docs].astype(np.int64)
    ends = np.cumsum(doc_sizes)
    starts = ends - doc_sizes
    positions = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    where = np.searchsorted(ends, positions, side="right" if extra else "left")
    past_end = where >= docs.size
    if past_end.any():
        if np.flatnonzero(past_end)[0] != num_samples - 1:
            raise ValueError(
                "build_sample_idx: document_index holds fewer tokens than num_epochs * tokens_per_epoch"
            )
        where[-1] = docs.size - 1
    offsets = positions - starts[np.minimum(where, docs.size - 1)]
    if past_end.any():
        offsets[-1] = int(sizes[docs[-1]]) - extra

    out = np.zeros((num_samples + 1, 2), dtype=out_dtype)
    out[1:, 0] = where
    out[1:, 1] = offsets
    return out


def build_sample_idx(
    sizes: npt.ArrayLike,
    document_index: npt.ArrayLike,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: int = 1,
) -> np.ndarray:
    """``[num_samples + 1, 2]`` array of (position in ``document_index``, token offset) where each sample
    starts; sample ``s`` spans from row ``s`` to row ``s + 1`` inclusive of one extra token.

    ``num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length`` (ceil instead of floor when
    ``drop_last_partial_sequence`` is False). int32 output, int64 when the document index or a document
    size exceeds int32.
    """
    if _cpp is None:
        _warn_fallback()
        return build_sample_idx_numpy(
            sizes,
            document_index,
            seq_length,
            num_epochs,
            tokens_per_epoch,
            drop_last_partial_sequence,
            add_extra_token_to_sequence,
        )
    extra = int(add_extra_token_to_sequence)
    _check_sample_args(seq_length, num_epochs, tokens_per_epoch, extra)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    docs = np.ascontiguousarray(document_index, dtype=np.int32)
    fn = (
        _cpp.build_sample_idx_int32
        if _sample_idx_dtype(sizes, docs) == np.int32
        else _cpp.build_sample_idx_int64
    )
    return fn(
        sizes,
        docs,
        int(seq_length),
        int(num_epochs),
        int(tokens_per_epoch),
        bool(drop_last_partial_sequence),
        extra,
    )


def _check_blending_args(
    dataset_index: np.ndarray,
    dataset_sample_index: np.ndarray,
    weights: np.ndarray,
    num_datasets: int,
    size: int,
) -> None:
    if num_datasets < 1:
        raise ValueError(f"num_datasets must be >= 1, got {num_datasets}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if weights.ndim != 1 or weights.shape[0] != num_datasets:
        raise ValueError(f"weights must be 1-D with {num_datasets} entries, got shape {weights.shape}")
    if dataset_index.dtype not in (np.uint8, np.int16):
        raise ValueError(f"dataset_index must be uint8 or int16, got {dataset_index.dtype}")
    if dataset_sample_index.dtype != np.int64:
        raise ValueError(f"dataset_sample_index must be int64, got {dataset_sample_index.dtype}")
    limit = 256 if dataset_index.dtype == np.uint8 else 32768
    if num_datasets > limit:
        raise ValueError(f"{dataset_index.dtype} dataset_index holds at most {limit} datasets")
    for name, arr in (("dataset_index", dataset_index), ("dataset_sample_index", dataset_sample_index)):
        if arr.ndim != 1 or arr.shape[0] < size:
            raise ValueError(f"{name} must be 1-D with at least size={size} entries, got shape {arr.shape}")
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError(f"{name} must be a contiguous, writeable array")


def build_blending_indices_python(
    dataset_index: np.ndarray,
    dataset_sample_index: np.ndarray,
    weights: npt.ArrayLike,
    num_datasets: int,
    size: int,
    verbose: bool = False,
) -> None:
    """Pure-Python loop stating :func:`build_blending_indices` (same output, slower): the fallback when the
    C++ extension is missing. It is not vectorised: each pick depends on the counts of all earlier ones."""
    w = np.ascontiguousarray(weights, dtype=np.float64)
    _check_blending_args(dataset_index, dataset_sample_index, w, num_datasets, size)
    wl = [float(x) for x in w]
    taken = [0] * num_datasets
    chosen = [0] * size
    local = [0] * size
    rest = range(1, num_datasets)
    for i in range(size):
        target = float(i) if i > 1 else 1.0
        best = 0
        best_lag = wl[0] * target - float(taken[0])
        for d in rest:
            lag = wl[d] * target - float(taken[d])
            if lag > best_lag:  # strict: ties go to the lower dataset id
                best_lag = lag
                best = d
        chosen[i] = best
        local[i] = taken[best]
        taken[best] += 1
    dataset_index[:size] = np.asarray(chosen, dtype=dataset_index.dtype)
    dataset_sample_index[:size] = np.asarray(local, dtype=np.int64)
    if verbose:
        print(f" > blending {size} samples:")
        for d in range(num_datasets):
            print(f"   dataset {d}, weight {wl[d]}, achieved {taken[d] / size if size else 0.0}")


def build_blending_indices(
    dataset_index: np.ndarray,
    dataset_sample_index: np.ndarray,
    weights: npt.ArrayLike,
    num_datasets: int,
    size: int,
    verbose: bool = False,
) -> None:
    """Fill ``dataset_index[:size]`` (uint8 or int16) and ``dataset_sample_index[:size]`` (int64) in place.

    Sample ``i`` is taken from the dataset ``d`` with the largest ``weights[d] * max(i, 1) - taken[d]``
    (ties to the lowest ``d``); ``dataset_sample_index[i]`` is how many samples ``d`` had given before.
    """
    w = np.ascontiguousarray(weights, dtype=np.float64)
    _check_blending_args(dataset_index, dataset_sample_index, w, num_datasets, size)
    if _cpp is None:
        _warn_fallback()
        build_blending_indices_python(dataset_index, dataset_sample_index, w, num_datasets, size, verbose)
        return
    _cpp.build_blending_indices(
        dataset_index, dataset_sample_index, w, int(num_datasets), int(size), bool(verbose)
    )
