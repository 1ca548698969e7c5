"""C++ index helpers vs the numpy fallback vs a plain-loop statement of Megatron's semantics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from megatron_cola.data import helpers

from .test_data_common import REPO

cpp = helpers._cpp
needs_cpp = pytest.mark.skipif(
    cpp is None, reason="C++ extension not built (python setup.py build_ext --inplace)"
)


def loop_sample_idx(sizes, docs, seq_length, num_epochs, tokens_per_epoch, drop_last=True, extra=1):
    """Megatron's sample-index walk written as a plain loop: each sample consumes seq_length + extra
    tokens from the current (document, offset) and the next one starts extra tokens before its end."""
    usable = num_epochs * tokens_per_epoch - extra
    n = usable // seq_length if drop_last else -(-usable // seq_length)
    rows = [(0, 0)]
    pos, off = 0, 0
    for s in range(1, n + 1):
        remaining = seq_length + extra
        while remaining:
            length = int(sizes[docs[pos]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - extra
                remaining = 0
            else:
                if pos == len(docs) - 1:
                    assert s == n
                    off = int(sizes[docs[pos]]) - extra
                    break
                pos += 1
                off = 0
        rows.append((pos, off))
    return np.array(rows, dtype=np.int64)


def _random_case(rng, short_docs: bool):
    n_docs = int(rng.integers(1, 40))
    hi = 6 if short_docs else 300
    sizes = rng.integers(1, hi, n_docs).astype(np.int32)
    if rng.random() < 0.3:  # a few empty documents too
        sizes[rng.integers(0, n_docs, max(1, n_docs // 5))] = 0
    if sizes.sum() < 2:
        sizes[0] = 2
    docs_in_split = np.arange(n_docs, dtype=np.int32)
    num_epochs = int(rng.integers(1, 30))
    doc_idx = np.tile(docs_in_split, num_epochs)
    rng.shuffle(doc_idx)
    seq_length = int(rng.integers(1, 64))
    return sizes, doc_idx, seq_length, num_epochs, int(sizes.sum())


@needs_cpp
@pytest.mark.parametrize("short_docs", [True, False])
def test_sample_idx_cpp_numpy_and_loop_agree(short_docs):
    rng = np.random.default_rng(1234 + short_docs)
    for _ in range(200):
        sizes, doc_idx, seq, epochs, tpe = _random_case(rng, short_docs)
        for drop_last in (True, False):
            for extra in (1, 0):
                got_cpp = cpp.build_sample_idx(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
                got_np = helpers.build_sample_idx_numpy(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
                ref = loop_sample_idx(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
                assert got_cpp.dtype == np.int32 and got_np.dtype == np.int32
                np.testing.assert_array_equal(got_cpp, got_np)
                np.testing.assert_array_equal(got_np.astype(np.int64), ref)
                got64 = cpp.build_sample_idx_int64(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
                assert got64.dtype == np.int64
                np.testing.assert_array_equal(got64, ref)


def test_sample_idx_many_epochs_short_docs_public_api():
    sizes = np.array([1, 2, 3, 1, 5, 2], dtype=np.int32)  # every document shorter than a sample
    doc_idx = np.tile(np.arange(6, dtype=np.int32), 500)
    np.random.default_rng(0).shuffle(doc_idx)
    out = helpers.build_sample_idx(sizes, doc_idx, 16, 500, int(sizes.sum()))
    assert out.shape == ((500 * 14 - 1) // 16 + 1, 2)
    np.testing.assert_array_equal(
        out, helpers.build_sample_idx_numpy(sizes, doc_idx, 16, 500, int(sizes.sum()))
    )
    # consecutive samples are exactly seq_length apart in the flattened stream
    starts = np.concatenate([[0], np.cumsum(sizes[doc_idx].astype(np.int64))])
    flat = starts[out[:, 0]] + out[:, 1]
    assert np.all(np.diff(flat) == 16)


@needs_cpp
def test_sample_idx_rejects_inconsistent_token_count():
    sizes = np.array([10, 10], dtype=np.int32)
    doc_idx = np.array([0, 1], dtype=np.int32)
    for fn in (cpp.build_sample_idx, helpers.build_sample_idx_numpy):
        with pytest.raises(ValueError, match="fewer tokens"):
            fn(sizes, doc_idx, 4, 2, 20, True, 1)  # claims 2 epochs, holds one


@needs_cpp
@pytest.mark.parametrize("index_dtype", [np.uint8, np.int16])
def test_blending_cpp_equals_numpy(index_dtype):
    rng = np.random.default_rng(7)
    for _ in range(60):
        k = int(rng.integers(1, 12))
        w = rng.random(k) + 1e-3
        w /= w.sum()
        size = int(rng.integers(0, 4000))
        a, a_s = np.zeros(size, index_dtype), np.zeros(size, np.int64)
        b, b_s = np.zeros(size, index_dtype), np.zeros(size, np.int64)
        cpp.build_blending_indices(a, a_s, w, k, size, False)
        helpers.build_blending_indices_python(b, b_s, w, k, size)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a_s, b_s)
        # dataset_sample_index counts each dataset's samples 0, 1, 2, ...
        for d in range(k):
            np.testing.assert_array_equal(a_s[a == d], np.arange(int((a == d).sum())))


def test_blending_proportions_within_one_percent():
    weights = np.array([0.2, 0.3, 0.5])
    size = 10_000
    idx, sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    helpers.build_blending_indices(idx, sample, weights, 3, size)
    achieved = np.bincount(idx, minlength=3) / size
    assert np.all(np.abs(achieved - weights) < 0.01), achieved
    # every prefix stays close too (greedy keeps the error bounded)
    for n in (100, 1000, 5000):
        assert np.all(np.abs(np.bincount(idx[:n], minlength=3) / n - weights) < 0.02)


def test_blending_argument_errors():
    with pytest.raises(ValueError, match="uint8 or int16"):
        helpers.build_blending_indices(np.zeros(4, np.int32), np.zeros(4, np.int64), [0.5, 0.5], 2, 4)
    with pytest.raises(ValueError, match="int64"):
        helpers.build_blending_indices(np.zeros(4, np.uint8), np.zeros(4, np.int32), [0.5, 0.5], 2, 4)
    with pytest.raises(ValueError, match="2 entries"):
        helpers.build_blending_indices(np.zeros(4, np.uint8), np.zeros(4, np.int64), [1.0], 2, 4)


def test_fallback_warns_once_and_matches():
    script = """
import sys, warnings
sys.modules["megatron_cola.data._helpers"] = None  # make the extension unimportable
import numpy as np
from megatron_cola.data import helpers
assert not helpers.HAVE_CPP_HELPERS
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sizes = np.array([5, 7, 3], dtype=np.int32); docs = np.array([2, 0, 1, 1, 0, 2], dtype=np.int32)
    a = helpers.build_sample_idx(sizes, docs, 4, 2, 15)
    b = helpers.build_sample_idx(sizes, docs, 4, 2, 15)
    i, s = np.zeros(50, np.uint8), np.zeros(50, np.int64)
    helpers.build_blending_indices(i, s, np.array([0.25, 0.75]), 2, 50)
msgs = [str(w.message) for w in caught if "_helpers" in str(w.message)]
assert len(msgs) == 1, msgs
print(a.tolist()); print(i.tolist()); print(s.tolist())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    sizes = np.array([5, 7, 3], dtype=np.int32)
    docs = np.array([2, 0, 1, 1, 0, 2], dtype=np.int32)
    assert lines[0] == str(loop_sample_idx(sizes, docs, 4, 2, 15).tolist())
    i, s = np.zeros(50, np.uint8), np.zeros(50, np.int64)
    helpers.build_blending_indices_python(i, s, np.array([0.25, 0.75]), 2, 50)
    assert lines[1] == str(i.tolist()) and lines[2] == str(s.tolist())
