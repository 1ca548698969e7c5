"""MMIDIDX reader/builder: spec round trips both ways, byte-exact output, merging, and bad files."""

from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest

from megatron_cola.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
)

from .test_data_common import spec_expected_idx_bytes, spec_read_dataset, spec_write_dataset


def _random_seqs(rng: random.Random, n: int, hi: int, max_len: int = 40) -> list[list[int]]:
    return [[rng.randrange(hi) for _ in range(rng.randint(0, max_len))] for _ in range(n)]


@pytest.mark.parametrize(
    "dtype,hi", [("uint16", 65535), ("int32", 2**31 - 1), ("uint8", 255), ("int64", 2**40)]
)
def test_spec_written_dataset_reads_back(tmp_path, dtype, hi):
    rng = random.Random(dtype)
    seqs = _random_seqs(rng, 57, hi)
    doc_starts = [0, 3, 3, 10, 30, 57]  # includes a document with zero sequences
    prefix = str(tmp_path / "spec")
    spec_write_dataset(prefix, seqs, doc_starts, dtype)

    ds = MMapIndexedDataset(prefix)
    assert len(ds) == len(seqs)
    assert ds.dtype == np.dtype(dtype)
    assert ds.sequence_lengths.dtype == np.int32
    assert ds.sequence_lengths.tolist() == [len(s) for s in seqs]
    assert ds.document_indices.tolist() == doc_starts
    for i, s in enumerate(seqs):
        assert ds[i].tolist() == s
    ds.check_integrity()
    # windows, negative indices, slices
    longest = int(np.argmax(ds.sequence_lengths))
    full = seqs[longest]
    assert ds.get(longest, 2, 5).tolist() == full[2:7]
    assert ds.get(longest, 3).tolist() == full[3:]
    assert ds[-1].tolist() == seqs[-1]
    assert [a.tolist() for a in ds[1:4]] == seqs[1:4]
    with pytest.raises(IndexError):
        ds.get(longest, len(full) - 1, 2)
    with pytest.raises(IndexError):
        ds[len(seqs)]


def test_builder_output_matches_spec_byte_for_byte(tmp_path):
    rng = random.Random(1)
    docs = [_random_seqs(rng, rng.randint(1, 3), 60000) for _ in range(40)]  # several sequences per document
    prefix = str(tmp_path / "ours")
    b = MMapIndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    lengths, doc_starts, flat = [], [0], []
    for k, doc in enumerate(docs):
        if k % 2:
            for seq in doc:
                b.add_item(np.array(seq, dtype=np.int64))
            b.end_document()
        else:
            b.add_document(np.concatenate([np.array(s, dtype=np.int64) for s in doc]), [len(s) for s in doc])
        lengths += [len(s) for s in doc]
        doc_starts.append(len(lengths))
        flat += [t for s in doc for t in s]
    bulk = [[rng.randrange(60000) for _ in range(rng.randint(1, 9))] for _ in range(25)]
    b.add_documents(np.array([t for s in bulk for t in s]), [len(s) for s in bulk])
    for s in bulk:
        lengths.append(len(s))
        doc_starts.append(len(lengths))
        flat += s
    b.finalize(index_file_path(prefix))

    with open(index_file_path(prefix), "rb") as f:
        assert f.read() == spec_expected_idx_bytes(lengths, doc_starts, "uint16")
    with open(data_file_path(prefix), "rb") as f:
        assert f.read() == struct.pack(f"<{len(flat)}H", *flat)
    dtype, seqs, starts = spec_read_dataset(prefix)
    assert dtype == "uint16" and starts == doc_starts
    assert [t for s in seqs for t in s] == flat


def test_add_index_merge_equals_single_build(tmp_path):
    rng = random.Random(2)
    parts = [_random_seqs(rng, n, 1000) for n in (5, 0, 12)]
    prefixes = []
    for k, seqs in enumerate(parts):
        p = str(tmp_path / f"part{k}")
        spec_write_dataset(p, seqs, list(range(len(seqs) + 1)), "int32")
        prefixes.append(p)
    merged = str(tmp_path / "merged")
    b = MMapIndexedDatasetBuilder(data_file_path(merged), np.int32)
    for p in prefixes:
        b.add_index(p)
    b.finalize(index_file_path(merged))

    single = str(tmp_path / "single")
    allseqs = [s for seqs in parts for s in seqs]
    spec_write_dataset(single, allseqs, list(range(len(allseqs) + 1)), "int32")
    for ext in (".bin", ".idx"):
        with open(merged + ext, "rb") as f1, open(single + ext, "rb") as f2:
            assert f1.read() == f2.read()

    b2 = MMapIndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(ValueError, match="dtype"):
        b2.add_index(prefixes[0])
    b2.abort()
    assert not os.path.exists(tmp_path / "x.bin")


def test_empty_dataset_and_dtype_choice(tmp_path):
    prefix = str(tmp_path / "empty")
    b = MMapIndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    b.finalize(index_file_path(prefix))
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 0 and ds.document_indices.tolist() == [0] and ds.num_tokens == 0
    assert best_fitting_dtype(32000) == np.uint16
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(128256) == np.int32
    b = MMapIndexedDatasetBuilder(str(tmp_path / "r.bin"), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        b.add_item([1, 70000])
    b.abort()


@pytest.fixture
def good_prefix(tmp_path):
    prefix = str(tmp_path / "good")
    spec_write_dataset(prefix, [[1, 2, 3], [4, 5], [6]], [0, 2, 3], "uint16")
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_wrong_magic(good_prefix):
    _patch(good_prefix + ".idx", 0, b"TNTIDX\x00\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*magic"):
        MMapIndexedDataset(good_prefix)


def test_unknown_version_and_dtype(good_prefix):
    _patch(good_prefix + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*version 2"):
        MMapIndexedDataset(good_prefix)
    _patch(good_prefix + ".idx", 9, struct.pack("<Q", 1))
    _patch(good_prefix + ".idx", 17, struct.pack("<B", 42))
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*dtype code 42"):
        MMapIndexedDataset(good_prefix)


def test_truncated_bin(good_prefix):
    with open(good_prefix + ".bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(IndexedDatasetError, match=r"good\.bin.*truncated.*8 bytes.*12 bytes") as exc:
        MMapIndexedDataset(good_prefix)
    assert isinstance(exc.value, ValueError)


def test_bin_too_large(good_prefix):
    with open(good_prefix + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"good\.bin.*larger"):
        MMapIndexedDataset(good_prefix)


def test_truncated_idx(good_prefix):
    size = os.path.getsize(good_prefix + ".idx")
    with open(good_prefix + ".idx", "r+b") as f:
        f.truncate(size - 4)
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*truncated"):
        MMapIndexedDataset(good_prefix)
    with open(good_prefix + ".idx", "r+b") as f:
        f.truncate(20)
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*truncated header"):
        MMapIndexedDataset(good_prefix)


def test_missing_file(good_prefix):
    os.remove(good_prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"good\.bin"):
        MMapIndexedDataset(good_prefix)


def test_pickle_reopens(good_prefix):
    import pickle

    ds = pickle.loads(pickle.dumps(MMapIndexedDataset(good_prefix)))
    assert ds[0].tolist() == [1, 2, 3] and ds.sizes.tolist() == [3, 2, 1] and ds.doc_idx.tolist() == [0, 2, 3]


def test_bad_document_indices(good_prefix):
    last_doc_entry = 34 + 3 * 4 + 3 * 8 + 2 * 8  # header, lengths, pointers, then the third doc index
    _patch(good_prefix + ".idx", last_doc_entry, struct.pack("<q", 5))
    with pytest.raises(IndexedDatasetError, match=r"good\.idx.*document indices"):
        MMapIndexedDataset(good_prefix)


def _corpus(tmp_path) -> str:
    os.makedirs(tmp_path, exist_ok=True)
    prefix = str(tmp_path / "c")
    seqs = [[k % 50] * (k % 7 + 1) for k in range(40)]
    spec_write_dataset(prefix, seqs, [0, 5, 5, 20, 40], "uint16")
    return prefix


def test_corrupt_length_is_caught_on_open(tmp_path):
    """A length raised by 3000 (the .bin size check cannot see it) used to train silently on the
    neighbouring documents; the vectorised check on open names the file and the entry."""
    prefix = _corpus(tmp_path)
    lengths = MMapIndexedDataset(prefix).sequence_lengths.tolist()
    lengths[10] += 3000
    lengths[11] -= 3000  # negative: the sum, and so the .bin size check, still agrees
    _patch(prefix + ".idx", 34 + 10 * 4, struct.pack("<2i", lengths[10], lengths[11]))
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: sequence 11 has negative length"):
        MMapIndexedDataset(prefix)
    prefix = _corpus(tmp_path / "b")
    _patch(prefix + ".idx", 34 + 10 * 4, struct.pack("<i", lengths[10]))  # +3000, pointers unchanged
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: sequence pointer 11 .* re-run tools/preprocess"):
        MMapIndexedDataset(prefix)
    # lengths and .bin consistent, a pointer off: still caught
    prefix = _corpus(tmp_path / "p")
    _patch(prefix + ".idx", 34 + 40 * 4 + 7 * 8, struct.pack("<q", 2))
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: sequence pointer 7 is 2"):
        MMapIndexedDataset(prefix)


def test_document_indices_checked_on_open(tmp_path):
    doc_off = 34 + 40 * 4 + 40 * 8
    prefix = _corpus(tmp_path)
    _patch(prefix + ".idx", doc_off + 2 * 8, struct.pack("<q", 3))  # 0, 5, 3, 20, 40: decreasing
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: document indices decrease at document 1"):
        MMapIndexedDataset(prefix)
    prefix = _corpus(tmp_path / "r")
    _patch(prefix + ".idx", doc_off + 1 * 8, struct.pack("<q", -1))
    with pytest.raises(IndexedDatasetError, match=r"c\.idx: document indices"):
        MMapIndexedDataset(prefix)


def test_empty_documents_in_builder_match_megatron(tmp_path):
    """add_documents(..., empty_as_no_sequence=True) = Megatron's add_document(ids, []) per empty document."""
    b = MMapIndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16)
    b.add_documents(np.array([1, 2, 3, 4], np.uint16), [0, 2, 0, 0, 2, 0], empty_as_no_sequence=True)
    b.finalize(str(tmp_path / "e.idx"))
    assert (tmp_path / "e.idx").read_bytes() == spec_expected_idx_bytes(
        [2, 2], [0, 0, 1, 1, 1, 2, 2], "uint16"
    )


def _long_dataset(tmp_path) -> str:
    """300 sequences of 100 uint16 tokens (60 KB of .bin), one document each."""
    prefix = str(tmp_path / "long")
    builder = MMapIndexedDatasetBuilder(data_file_path(prefix), dtype=np.uint16)
    for i in range(300):
        builder.add_item(np.full(100, i + 1, dtype=np.int64))
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return prefix


@pytest.mark.parametrize("cut", [4, 8192])
def test_bin_truncated_while_open_is_a_data_error_naming_it(tmp_path, cut):
    """A .bin that shrinks under a running job: 4 bytes used to read stale zeros, 8 KiB a SIGBUS. Now
    the read of a lost sequence and the per-log-interval check both name the file; what is still on
    disk reads as before."""
    from megatron_cola.data import BlendedDataset, GPTDataset, check_dataset_files

    prefix = _long_dataset(tmp_path)
    ds = MMapIndexedDataset(prefix)
    gpt = GPTDataset(ds, (0, 300), seq_length=50, num_samples=None, seed=1, cache_dir=str(tmp_path))
    blend = BlendedDataset([gpt], [1.0], 10)
    check_dataset_files(blend, None)  # unchanged: nothing to say
    size = os.path.getsize(data_file_path(prefix))
    with open(data_file_path(prefix), "r+b") as f:
        f.truncate(size - cut)
    assert ds.get(0).tolist() == [1] * 100  # before the cut: intact
    with pytest.raises(IndexedDatasetError) as e:
        ds.get(299)
    assert f"{data_file_path(prefix)}: changed while the run was reading it: {size} bytes when opened" in str(
        e.value
    )
    assert f"{size - cut} now (truncated)" in str(e.value)
    with pytest.raises(IndexedDatasetError, match=r"long\.bin: changed while the run"):
        check_dataset_files(blend)
    with pytest.raises(IndexedDatasetError, match=r"long\.bin"):
        for i in range(len(gpt)):  # every sample of the split, as an epoch would read them
            gpt[i]


def test_idx_rewritten_while_open_is_named(tmp_path):
    from megatron_cola.data import check_dataset_files

    prefix = _long_dataset(tmp_path)
    ds = MMapIndexedDataset(prefix)
    with open(index_file_path(prefix), "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(IndexedDatasetError, match=r"long\.idx: changed while the run.*\(grown\)"):
        check_dataset_files(ds)
