"""Megatron-compatible memory-mapped indexed dataset (``MMIDIDX`` version 1).

A dataset is a pair of files sharing a prefix:

* ``{prefix}.bin``: the token ids of every sequence, back to back, in one numpy dtype;
* ``{prefix}.idx``: ``b"MMIDIDX\\x00\\x00"``, ``<Q`` version (1), ``<B`` dtype code, ``<Q`` sequence count N,
  ``<Q`` document-index count D, then ``int32 lengths[N]``, ``int64 byte pointers[N]``,
  ``int64 document_indices[D]`` (sequence index where each document starts, with a leading 0 and a
  trailing N).

This is the layout Megatron-LM (legacy and core) and GPT-NeoX write, so their datasets load here as-is
and ours load there. The reader validates the header and the file sizes up front and raises
:class:`IndexedDatasetError` naming the file and the problem instead of reading garbage.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from array import array
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from megatron_cola.errors import DataError

__all__ = [
    "DTYPE_CODES",
    "check_dataset_files",
    "DatasetNotFoundError",
    "IndexedDatasetError",
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "best_fitting_dtype",
    "commit_dataset",
    "data_file_path",
    "dtype_code",
    "index_file_path",
    "remove_dataset",
]

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# magic (9) + version <Q (8) + dtype code <B (1) + sequence count <Q (8) + document count <Q (8)
INDEX_HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8

#: dtype code -> numpy dtype, as in Megatron-LM core's ``DType`` enum.
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class IndexedDatasetError(DataError):
    """An ``.idx``/``.bin`` pair that cannot be read: wrong magic, unknown version or dtype, sizes that
    disagree. The message names the offending file."""


class DatasetNotFoundError(IndexedDatasetError, FileNotFoundError):
    """The ``.idx`` or ``.bin`` of a dataset prefix does not exist."""


def index_file_path(prefix: str) -> str:
    """``{prefix}.idx``."""
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    """``{prefix}.bin``."""
    return prefix + ".bin"


def best_fitting_dtype(vocab_size: int | None) -> type[np.generic]:
    """Token dtype Megatron picks for a vocabulary: ``uint16`` when ``vocab_size < 65500``, else ``int32``."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def dtype_code(dtype: npt.DTypeLike) -> int:
    """The ``.idx`` code of a numpy dtype (raises ``ValueError`` for dtypes the format cannot store)."""
    dt = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dt:
            return code
    allowed = ", ".join(np.dtype(d).name for d in DTYPE_CODES.values())
    raise ValueError(f"dtype {dt.name} cannot be stored in an MMIDIDX dataset (allowed: {allowed})")


def remove_dataset(prefix: str) -> None:
    """Delete ``{prefix}.idx`` and ``{prefix}.bin`` if they exist (index first, so a half-deleted pair never
    looks valid)."""
    for path in (index_file_path(prefix), data_file_path(prefix)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def commit_dataset(tmp_prefix: str, final_prefix: str) -> None:
    """Atomically publish a finished ``tmp_prefix`` pair as ``final_prefix``.

    Any old ``.idx`` is removed first, then the ``.bin`` is renamed, then the ``.idx``: the index is the
    commit point, so an interruption at any moment leaves either no ``.idx`` or a complete, consistent pair.
    """
    try:
        os.remove(index_file_path(final_prefix))
    except FileNotFoundError:
        pass
    os.replace(data_file_path(tmp_prefix), data_file_path(final_prefix))
    os.replace(index_file_path(tmp_prefix), index_file_path(final_prefix))


class MMapIndexedDataset:
    """Read-only, memory-mapped view of an ``MMIDIDX`` v1 dataset.

    ``len(ds)`` is the number of sequences, ``ds[i]`` a read-only numpy array of sequence ``i``
    (``ds[a:b]`` a list of them), ``ds.get(i, offset, length)`` a window of one sequence.
    """

    def __init__(self, path_prefix: str, check_integrity: bool = True) -> None:
        self._path_prefix = path_prefix
        self._digest: str | None = None
        self._open(check_integrity)

    # ------------------------------------------------------------------ opening and validation
    def _open(self, check: bool = True) -> None:
        idx_path = index_file_path(self._path_prefix)
        bin_path = data_file_path(self._path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DatasetNotFoundError(f"{path}: no such file (dataset prefix {self._path_prefix!r})")

        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(INDEX_HEADER_SIZE)
        if len(header) < len(INDEX_MAGIC) or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
            raise IndexedDatasetError(
                f"{idx_path}: not an MMIDIDX index (magic {header[: len(INDEX_MAGIC)]!r}, "
                f"expected {INDEX_MAGIC!r})"
            )
        if len(header) < INDEX_HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path}: truncated header ({len(header)} bytes, need {INDEX_HEADER_SIZE})"
            )
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (expected 1)")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self._dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack_from("<QQ", header, 18)
        expected_idx = INDEX_HEADER_SIZE + n_seq * (4 + 8) + n_doc * 8
        if idx_size != expected_idx:
            what = "truncated" if idx_size < expected_idx else "has trailing bytes"
            raise IndexedDatasetError(
                f"{idx_path}: index {what}: {idx_size} bytes on disk, header says {n_seq} sequences and "
                f"{n_doc} document indices = {expected_idx} bytes"
            )

        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        off = INDEX_HEADER_SIZE
        self._lengths = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self._pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self._doc_indices = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)

        # Megatron's builder ends with n_seq; a smaller last entry (sequences after the last document
        # boundary) is tolerated as Megatron's reader does, anything else is corrupt.
        if n_doc < 1 or self._doc_indices[0] != 0 or self._doc_indices[-1] > n_seq:
            first = int(self._doc_indices[0]) if n_doc else None
            last = int(self._doc_indices[-1]) if n_doc else None
            raise IndexedDatasetError(
                f"{idx_path}: document indices must start at 0 and end at most at the sequence count {n_seq} "
                f"(got {n_doc} entries, first {first}, last {last})"
            )
        if n_seq:
            if self._pointers[0] != 0:
                raise IndexedDatasetError(f"{idx_path}: first sequence pointer is {self._pointers[0]}, not 0")
            expected_bin = int(self._pointers[-1]) + int(self._lengths[-1]) * self._dtype.itemsize
        else:
            expected_bin = 0
        bin_size = os.path.getsize(bin_path)
        if bin_size != expected_bin:
            what = "truncated" if bin_size < expected_bin else "larger than the index says"
            raise IndexedDatasetError(
                f"{bin_path}: data file {what}: {bin_size} bytes on disk, {idx_path} describes "
                f"{expected_bin} bytes ({n_seq} sequences of {self._dtype.name})"
            )
        # The .bin is read with pread, not through a memory map: a file that shrinks under a running job
        # gives a short read (an IndexedDatasetError naming it) instead of zeros from a stale page or a
        # SIGBUS that kills the process without a word. The sizes are kept to re-check them.
        self._bin_file = open(bin_path, "rb", buffering=0)  # noqa: SIM115  (closed with the object)
        self._idx_file = open(idx_path, "rb", buffering=0)  # noqa: SIM115  (fstat of the mapped index)
        self._bin_size = bin_size
        self._idx_size = idx_size
        if check:
            self.check_integrity()

    def check_integrity(self) -> None:
        """Vectorised O(N) consistency check of the index, run when the dataset is opened: lengths are
        non-negative, every pointer is the running byte offset of the lengths before it (so the last
        sequence ends exactly at the ``.bin`` size, checked on open), document indices are non-decreasing
        and within ``[0, N]``. Raises :class:`IndexedDatasetError` naming the file, the entry and the fix."""
        idx_path = index_file_path(self._path_prefix)
        hint = "the .idx does not describe its .bin: re-run tools/preprocess_data.py for this dataset"
        lengths = self._lengths
        if len(lengths) and lengths.min() < 0:
            i = int(np.flatnonzero(lengths < 0)[0])
            raise IndexedDatasetError(f"{idx_path}: sequence {i} has negative length {lengths[i]}; {hint}")
        expected = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= self._dtype.itemsize
        bad = np.flatnonzero(expected != self._pointers)
        if bad.size:
            i = int(bad[0])
            raise IndexedDatasetError(
                f"{idx_path}: sequence pointer {i} is {self._pointers[i]}, but the lengths before it put "
                f"sequence {i} at byte {expected[i]} (a length or pointer is corrupt); {hint}"
            )
        docs = self._doc_indices
        steps = np.diff(docs)
        if steps.size and steps.min() < 0:
            d = int(np.flatnonzero(steps < 0)[0])
            raise IndexedDatasetError(
                f"{idx_path}: document indices decrease at document {d} ({docs[d]} -> {docs[d + 1]}); {hint}"
            )
        if docs.size and (docs.min() < 0 or docs.max() > len(lengths)):
            raise IndexedDatasetError(
                f"{idx_path}: document indices outside [0, {len(lengths)}] "
                f"(min {docs.min()}, max {docs.max()}); {hint}"
            )

    # ------------------------------------------------------------------ pickling (DataLoader workers)
    def __getstate__(self) -> str:
        return self._path_prefix

    def __setstate__(self, state: str) -> None:
        self._path_prefix = state
        self._digest = None
        self._open(check=False)  # checked when first opened; DataLoader workers need not repeat it

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length`` is None)."""
        n = len(self._lengths)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {n} sequences")
        seq_len = int(self._lengths[i])
        offset = int(offset)
        if length is None:
            length = seq_len - offset
        length = int(length)
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"window offset={offset} length={length} outside sequence {i} of length {seq_len}"
            )
        itemsize = self._dtype.itemsize
        start = int(self._pointers[i]) + offset * itemsize
        want = length * itemsize
        data = os.pread(self._bin_file.fileno(), want, start) if want else b""
        if len(data) != want:
            self.check_unchanged()  # names the file and both sizes
            raise IndexedDatasetError(
                f"{data_file_path(self._path_prefix)}: read {len(data)} of {want} bytes at offset {start} "
                f"(sequence {i}); the file is shorter than its index says"
            )
        out = np.frombuffer(data, dtype=self._dtype)
        return out

    def check_unchanged(self) -> None:
        """Raise :class:`IndexedDatasetError` naming the file when the ``.bin`` or ``.idx`` opened by this
        dataset has another size now (truncated or rewritten in place while a run reads it). Two
        ``fstat`` calls: cheap enough for every log interval."""
        for path, f, opened in (
            (data_file_path(self._path_prefix), self._bin_file, self._bin_size),
            (index_file_path(self._path_prefix), self._idx_file, self._idx_size),
        ):
            now = os.fstat(f.fileno()).st_size
            if now != opened:
                raise IndexedDatasetError(
                    f"{path}: changed while the run was reading it: {opened} bytes when opened, {now} now "
                    f"({'truncated' if now < opened else 'grown'}). A dataset must not change under a "
                    "running job: restore it (or re-run tools/preprocess_data.py into a new prefix) and "
                    "resume from the last checkpoint"
                )

    @property
    def path_prefix(self) -> str:
        return self._path_prefix

    @property
    def index_digest(self) -> str:
        """SHA-1 of the ``.idx`` bytes (computed once; about 1 GB/s): identifies the sequence lengths the
        sample indices are built from."""
        if self._digest is None:
            self._digest = hashlib.sha1(memoryview(self._idx_mmap)).hexdigest()
        return self._digest

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 token count of every sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in the ``.bin``."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 ``[D]``: document ``d`` is sequences ``[document_indices[d], document_indices[d+1])``."""
        return self._doc_indices

    # Megatron-legacy / GPT-NeoX names.
    sizes = sequence_lengths
    doc_idx = document_indices

    @property
    def num_tokens(self) -> int:
        return self._bin_size // self._dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"MMapIndexedDataset({self._path_prefix!r}, sequences={len(self)}, "
            f"documents={len(self._doc_indices) - 1}, tokens={self.num_tokens}, dtype={self._dtype.name})"
        )


def check_dataset_files(*datasets: object) -> None:
    """``check_unchanged`` on every :class:`MMapIndexedDataset` under ``datasets`` (GPT datasets hold
    one as ``indexed_dataset``, blended datasets hold theirs in ``datasets``; ``None`` is skipped)."""
    seen: set[int] = set()
    stack = [d for d in datasets if d is not None]
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        if isinstance(d, MMapIndexedDataset):
            d.check_unchanged()
        elif hasattr(d, "indexed_dataset"):
            stack.append(d.indexed_dataset)
        elif hasattr(d, "datasets"):
            stack.extend(d.datasets)


class MMapIndexedDatasetBuilder:
    """Writes a ``.bin`` incrementally and the matching ``.idx`` on :meth:`finalize`.

    The output is byte-for-byte what Megatron-LM's builder writes for the same calls. Token arrays go
    straight to a large buffered file; lengths and document boundaries are kept in compact ``array``s.
    """

    def __init__(self, bin_path: str, dtype: npt.DTypeLike = np.int32, buffer_size: int = 1 << 23) -> None:
        self._dtype = np.dtype(dtype)
        self._code = dtype_code(self._dtype)
        self._bin_path = bin_path
        self._file = open(bin_path, "wb", buffering=buffer_size)  # closed in finalize()/abort()
        self._lengths = array("i")
        self._doc_indices = array("q", [0])
        if np.issubdtype(self._dtype, np.integer):
            info = np.iinfo(self._dtype)
            self._range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._range = None

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _as_dtype(self, tokens: npt.ArrayLike) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype != self._dtype:
            if self._range is not None and arr.size and np.issubdtype(arr.dtype, np.integer):
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._range[0] or hi > self._range[1]:
                    raise DataError(
                        f"token ids in [{lo}, {hi}] do not fit the dataset dtype {self._dtype.name}; "
                        "use a wider dtype (vocab >= 65500 needs int32)"
                    )
            arr = arr.astype(self._dtype)
        return np.ascontiguousarray(arr)

    def add_item(self, tokens: npt.ArrayLike) -> None:
        """Append one sequence."""
        arr = self._as_dtype(tokens)
        self._file.write(memoryview(arr).cast("B"))
        self._lengths.append(arr.size)

    def end_document(self) -> None:
        """Close the current document (the sequences added since the last call)."""
        self._doc_indices.append(len(self._lengths))

    def add_document(self, tokens: npt.ArrayLike, lengths: Iterable[int]) -> None:
        """Append one document made of ``len(lengths)`` sequences stored back to back in ``tokens``."""
        arr = self._as_dtype(tokens)
        lens = [int(x) for x in lengths]
        if sum(lens) != arr.size:
            raise ValueError(f"lengths sum to {sum(lens)} but {arr.size} tokens were given")
        self._file.write(memoryview(arr).cast("B"))
        self._lengths.extend(lens)
        self._doc_indices.append(len(self._lengths))

    def add_documents(
        self, tokens: npt.ArrayLike, lengths: npt.ArrayLike, empty_as_no_sequence: bool = False
    ) -> None:
        """Bulk append: ``lengths[k]`` tokens of ``tokens`` form document ``k`` (one sequence each).

        With ``empty_as_no_sequence`` a zero length is a document without any sequence (its boundary repeats
        in the document index), which is what Megatron's ``add_document(ids, [])`` writes for a document that
        tokenizes to nothing; otherwise it is a document holding one zero-length sequence.
        """
        arr = self._as_dtype(tokens)
        lens = np.asarray(lengths, dtype=np.int32)
        if int(lens.sum(dtype=np.int64)) != arr.size:
            raise ValueError(f"lengths sum to {int(lens.sum())} but {arr.size} tokens were given")
        if arr.size:
            self._file.write(memoryview(arr).cast("B"))
        start = len(self._lengths)
        if empty_as_no_sequence:
            ends = start + np.cumsum(lens > 0, dtype=np.int64)
            lens = lens[lens > 0]
        else:
            ends = np.arange(start + 1, start + 1 + lens.size, dtype=np.int64)
        self._lengths.frombytes(lens.tobytes())
        self._doc_indices.frombytes(ends.tobytes())

    def add_index(self, other_prefix: str) -> None:
        """Append a whole existing dataset (same dtype) after what was written so far, as Megatron's
        ``add_index`` does when merging."""
        other = MMapIndexedDataset(other_prefix)
        if other.dtype != self._dtype:
            raise IndexedDatasetError(
                f"{index_file_path(other_prefix)}: dtype {other.dtype.name} differs from the builder's "
                f"{self._dtype.name}; datasets with different dtypes cannot be merged"
            )
        offset = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths).tobytes())
        self._doc_indices.frombytes((other.document_indices[1:] + offset).astype(np.int64).tobytes())
        del other
        self._file.flush()
        with open(data_file_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._file, 1 << 24)

    def finalize(self, idx_path: str) -> None:
        """Flush and close the ``.bin`` and write the ``.idx``."""
        self._file.close()
        lengths = (
            np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        )
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self._dtype.itemsize
        doc_indices = np.frombuffer(self._doc_indices, dtype=np.int64)
        with open(idx_path, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", self._code))
            f.write(struct.pack("<Q", lengths.size))
            f.write(struct.pack("<Q", doc_indices.size))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_indices.tobytes(order="C"))

    def abort(self) -> None:
        """Close and delete the partial ``.bin`` (used when a run fails)."""
        if not self._file.closed:
            self._file.close()
        try:
            os.remove(self._bin_path)
        except FileNotFoundError:
            pass

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_indices) - 1
