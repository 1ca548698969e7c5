"""GPTDataset, BlendedDataset, build_train_valid_test_datasets: windows, epochs, caching, blending, errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from megatron_cola.data import (
    BlendedDataset,
    GPTDataset,
    MMapIndexedDataset,
    blend_sizes,
    build_train_valid_test_datasets,
    check_data_prefix,
    parse_data_path,
    parse_split,
    split_ranges,
)
from megatron_cola.errors import DataError

from .test_data_common import REPO, spec_write_dataset


def _make_prefix(directory, name: str, n_docs: int, seed: int, lo: int = 1, hi: int = 60) -> str:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 30000, int(rng.integers(lo, hi))).tolist() for _ in range(n_docs)]
    prefix = os.path.join(directory, name)
    spec_write_dataset(prefix, docs, list(range(n_docs + 1)), "uint16")
    return prefix


@pytest.fixture
def prefix(tmp_path):
    return _make_prefix(tmp_path, "corpus_text_document", 200, seed=0)


def _check_windows(ds: GPTDataset) -> None:
    """Every sample is the window [s*L, s*L + L + 1) of the documents concatenated in document-index order."""
    reader = ds.indexed_dataset
    stream = np.concatenate([reader[int(d)] for d in ds.document_index]).astype(np.int64)
    L = ds.seq_length
    assert sorted(np.asarray(ds.shuffle_index).tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        s = int(ds.shuffle_index[i])
        tokens = ds[i]["text"]
        assert tokens.dtype == np.int64 and tokens.shape == (L + 1,)
        np.testing.assert_array_equal(tokens, stream[s * L : s * L + L + 1])


@pytest.mark.parametrize("seq_length,num_samples", [(16, 50), (7, 3000), (300, 40)])
def test_samples_are_contiguous_windows(prefix, tmp_path, seq_length, num_samples):
    reader = MMapIndexedDataset(prefix)
    ds = GPTDataset(reader, range(20, 180), seq_length, num_samples, seed=5, cache_dir=str(tmp_path / "c"))
    assert len(ds) >= num_samples
    _check_windows(ds)
    tokens_per_epoch = int(reader.sequence_lengths[20:180].sum())
    epochs = len(ds.document_index) // 160
    assert epochs == max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    counts = np.bincount(np.asarray(ds.document_index), minlength=200)
    assert np.all(counts[20:180] == epochs) and counts[:20].sum() == 0 and counts[180:].sum() == 0
    assert len(ds) == (epochs * tokens_per_epoch - 1) // seq_length


def test_separate_last_epoch(prefix, tmp_path):
    reader = MMapIndexedDataset(prefix)
    tpe = int(reader.sequence_lengths.sum())
    per_epoch = (tpe - 1) // 8
    ds = GPTDataset(reader, range(200), 8, 2 * per_epoch + per_epoch // 10, seed=1, cache_dir=str(tmp_path))
    docs = np.asarray(ds.document_index)
    assert len(docs) == 3 * 200
    # the last epoch is shuffled on its own: its documents are exactly one copy of each
    assert sorted(docs[400:].tolist()) == list(range(200))
    shuffle = np.asarray(ds.shuffle_index)
    before_last = (2 * tpe - 1) // 8
    assert sorted(shuffle[:before_last].tolist()) == list(range(before_last))
    _check_windows(ds)


def test_cache_reuse_and_keys(prefix, tmp_path):
    cache = str(tmp_path / "cache")
    a = GPTDataset(prefix, (0, 150), 32, 100, seed=3, cache_dir=cache)
    assert a.built_indices
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and all(f.startswith(a.unique_hash) for f in files)
    assert not [f for f in files if ".tmp" in f]
    mtimes = {f: os.path.getmtime(os.path.join(cache, f)) for f in files}
    b = GPTDataset(prefix, (0, 150), 32, 100, seed=3, cache_dir=cache)
    assert not b.built_indices
    assert {f: os.path.getmtime(os.path.join(cache, f)) for f in files} == mtimes
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(a[i]["text"], b[i]["text"]) for i in range(len(a)))
    # anything that defines the indices changes the key
    c = GPTDataset(prefix, (0, 150), 32, 100, seed=4, cache_dir=cache)
    d = GPTDataset(prefix, (0, 149), 32, 100, seed=3, cache_dir=cache)
    e = GPTDataset(prefix, (0, 150), 33, 100, seed=3, cache_dir=cache)
    assert len({a.unique_hash, c.unique_hash, d.unique_hash, e.unique_hash}) == 4
    assert c.built_indices and d.built_indices and e.built_indices
    assert not np.array_equal(np.asarray(a.shuffle_index), np.asarray(c.shuffle_index))
    # an incomplete cache (description missing) is rebuilt
    os.remove(os.path.join(cache, f"{a.unique_hash}-GPTDataset-train-description.json"))
    assert GPTDataset(prefix, (0, 150), 32, 100, seed=3, cache_dir=cache).built_indices
    # default cache location
    f = GPTDataset(prefix, (0, 150), 32, 10, seed=3)
    assert f.cache_dir == os.path.join(os.path.dirname(prefix), "index-cache")
    assert os.path.isdir(f.cache_dir)


def test_split_parsing():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert split_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges("969,30,1", 100) == [(0, 97), (97, 100), (100, 100)]
    # Megatron core's boundaries: round(cumulative fraction * n) (not per-split rounding)
    assert split_ranges("969,30,1", 1854) == [(0, 1797), (1797, 1852), (1852, 1854)]
    for n in (1, 7, 10, 999, 12345):
        r = split_ranges("80,15,5", n)
        assert r[0][0] == 0 and r[-1][1] == n and all(a[1] == b[0] for a, b in zip(r, r[1:]))
    for bad in ("", "a,b", "1,2,3,4", "-1,2", "0,0,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_builder_single_prefix(prefix, tmp_path):
    train, valid, test = build_train_valid_test_datasets(
        [prefix], "90,10,0", 16, (300, 20, 5), seed=7, cache_dir=str(tmp_path / "c")
    )
    assert test is None  # zero weight
    assert len(train) >= 300 and len(valid) >= 20
    assert train.documents.tolist() == list(range(180)) and valid.documents.tolist() == list(range(180, 200))
    _check_windows(valid)
    train2, valid2, test2 = build_train_valid_test_datasets(
        [prefix], "90,10,0", 16, (300, 0, 0), seed=7, cache_dir=str(tmp_path / "c")
    )
    assert valid2 is None and test2 is None and not train2.built_indices


def test_blending_proportions_and_items(tmp_path):
    prefixes = [_make_prefix(tmp_path, f"p{k}", 80, seed=k) for k in range(3)]
    data_path = ["2", prefixes[0], "3", prefixes[1], "5", prefixes[2]]
    n = 5000
    train, valid, _ = build_train_valid_test_datasets(
        data_path, "95,5,0", 8, (n, 200, 0), seed=11, cache_dir=str(tmp_path / "c")
    )
    assert isinstance(train, BlendedDataset) and len(train) == n and len(valid) == 200
    achieved = np.bincount(train.dataset_index, minlength=3) / n
    assert np.all(np.abs(achieved - [0.2, 0.3, 0.5]) < 0.01), achieved
    # Megatron core: component k is built for ceil(ceil(w_k n) * 1.005) samples (worked by hand here)
    assert [d.num_samples for d in train.datasets] == [1005, 1508, 2513]
    for i in range(0, n, 97):
        d, s = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        np.testing.assert_array_equal(train[i]["text"], train.datasets[d][s]["text"])
    with pytest.raises(ValueError, match="has 3 samples but the blend needs"):
        BlendedDataset([list(range(3)), list(range(100))], [0.5, 0.5], 20)


def test_data_path_errors(prefix, tmp_path):
    assert parse_data_path([prefix]) == ([prefix], None)
    assert parse_data_path(["1", "a", "3", "b"]) == (["a", "b"], [0.25, 0.75])
    with pytest.raises(ValueError, match="odd length"):
        parse_data_path(["0.5", "a", "0.5"])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path(["0", "a", "1", "b"])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path(["-1", "a", "1", "b"])
    with pytest.raises(ValueError, match="needs weights"):
        parse_data_path(["a", "b"])
    base = prefix[: -len("_text_document")]
    with pytest.raises(FileNotFoundError, match="did you mean .*corpus_text_document"):
        build_train_valid_test_datasets([base], "1", 8, (10, 0, 0), seed=1)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_train_valid_test_datasets(
            ["1", prefix, "1", str(tmp_path / "nope")], "1", 8, (10, 0, 0), seed=1
        )
    # the prefix that exists is named: given with .bin, or another key's dataset beside it
    with pytest.raises(DataError, match=rf"'{prefix}\.bin': missing .*; did you mean {prefix}\?"):
        check_data_prefix(prefix + ".bin")
    content = _make_prefix(tmp_path, "web_content_document", 3, seed=2)
    with pytest.raises(DataError, match=rf"did you mean {content}\?"):
        check_data_prefix(str(tmp_path / "web"))
    with pytest.raises(
        DataError, match=r"'.*nope': missing .*nope\.idx, .*nope\.bin; give the prefix without ext"
    ):
        check_data_prefix(str(tmp_path / "nope"))
    tiny = _make_prefix(tmp_path, "tiny", 3, seed=1)
    with pytest.raises(ValueError, match="valid split has no documents"):
        build_train_valid_test_datasets([tiny], "98,2,0", 8, (10, 10, 0), seed=1)


def test_dataloader_with_sampler(prefix, tmp_path):
    import torch

    from megatron_cola.data import PretrainingSampler

    ds = GPTDataset(prefix, (0, 200), 16, 64, seed=0, cache_dir=str(tmp_path))
    sampler = PretrainingSampler(len(ds), 8, micro_batch_size=4, data_parallel_rank=1, data_parallel_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0)
    batch = next(iter(loader))
    assert batch["text"].shape == (4, 17) and batch["text"].dtype == torch.int64
    torch.testing.assert_close(batch["text"][0], torch.from_numpy(ds[8 + 4]["text"]))


DIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    dist.init_process_group("gloo")
    from megatron_cola.data import GPTDataset
    ds = GPTDataset(sys.argv[1], (0, 200), 16, 400, seed=9, cache_dir=sys.argv[2])
    print(json.dumps({"rank": dist.get_rank(), "built": ds.built_indices,
                      "first": ds[0]["text"].tolist(), "n": len(ds)}))
    dist.destroy_process_group()
    """
)


def test_distributed_rank0_builds_others_load(prefix, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), prefix, str(tmp_path / "cache")],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    results.sort(key=lambda r: r["rank"])
    assert [r["built"] for r in results] == [True, False]
    assert results[0]["first"] == results[1]["first"] and results[0]["n"] == results[1]["n"]


def test_unwritable_cache_falls_back_to_memory(prefix, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not write the dataset index cache"):
        ds = GPTDataset(prefix, (0, 200), 16, 50, seed=2, cache_dir=str(blocker / "cache"))
    ref = GPTDataset(prefix, (0, 200), 16, 50, seed=2, cache_dir=str(tmp_path / "ok"))
    assert all(np.array_equal(ds[i]["text"], ref[i]["text"]) for i in range(len(ds)))


# Megatron-LM core's documented blend sizing, worked out by hand: per component ceil(w n) samples used
# and ceil(ceil(w n) * 1.005) built; the blend is sum_k ceil(w_k n) long.
BLEND_CASES = [
    # weights, n, used per component, built per component
    ([0.37, 0.63], 777, [288, 490], [290, 493]),  # 287.49 -> 288, 489.51 -> 490; 289.44 -> 290, 492.45 -> 493
    ([1, 2], 398, [133, 266], [134, 268]),  # 132.67 -> 133, 265.33 -> 266; 133.665 -> 134, 267.33 -> 268
    ([1, 3], 400, [100, 300], [101, 302]),  # divides n: 100.5 -> 101, 301.5 -> 302
    ([3, 7], 1000, [300, 700], [302, 704]),  # divides n: 301.5 -> 302, 703.5 -> 704
]


def _greedy(weights: list[float], size: int) -> list[int]:
    """Megatron's blending order restated: pick the dataset lagging w * max(i, 1) the most, ties low."""
    taken = [0] * len(weights)
    out = []
    for i in range(size):
        lag = [w * max(i, 1) - t for w, t in zip(weights, taken)]
        d = lag.index(max(lag))
        out.append(d)
        taken[d] += 1
    return out


@pytest.mark.parametrize("weights,n,used,built", BLEND_CASES)
def test_blend_sizes_match_megatron(weights, n, used, built):
    total = sum(weights)
    targets, requests, size = blend_sizes([w / total for w in weights], n)
    assert targets == used and requests == built and size == sum(used)


def test_blend_sizes_exact_on_random_cases():
    """Against exact rational arithmetic, away from ties where float rounding could decide."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(400):
        raw = rng.integers(1, 50, int(rng.integers(2, 5))).tolist()
        n = int(rng.integers(1, 100_000))
        exact = [Fraction(r, sum(raw)) * n for r in raw]
        if any(abs(float(e) - round(float(e))) < 1e-6 for e in exact):
            continue
        used = [-(-e.numerator // e.denominator) for e in exact]
        built = [-(-(u * 1005) // 1000) for u in used]
        if any(u * 1005 % 1000 == 0 for u in used):  # 1.005 * used is whole: float may land either side
            continue
        w = (np.asarray(raw, np.float64) / np.sum(raw)).tolist()
        assert blend_sizes(w, n) == (used, built, sum(used)), (raw, n)
        checked += 1
    assert checked > 200


@pytest.mark.parametrize("weights,n,used,built", BLEND_CASES[:2] + BLEND_CASES[3:])
def test_blended_split_sizes_and_order_match_megatron(tmp_path, weights, n, used, built):
    """The valid split of a two-prefix blend: its length, each component's size and the sample order."""
    prefixes = [_make_prefix(tmp_path, f"b{k}", 60, seed=30 + k) for k in range(2)]
    data_path = [str(weights[0]), prefixes[0], str(weights[1]), prefixes[1]]
    _, valid, _ = build_train_valid_test_datasets(
        data_path, "50,50,0", 16, (10, n, 0), seed=3, cache_dir=str(tmp_path / "c")
    )
    assert isinstance(valid, BlendedDataset) and len(valid) == sum(used)
    assert [d.num_samples for d in valid.datasets] == built
    total = sum(weights)
    order = _greedy([w / total for w in weights], sum(used))
    assert valid.dataset_index.tolist() == order
    assert np.bincount(valid.dataset_index).tolist() == used
    for i in range(0, len(valid), 37):
        d, s = int(valid.dataset_index[i]), int(valid.dataset_sample_index[i])
        assert s == order[:i].count(d)
        np.testing.assert_array_equal(valid[i]["text"], valid.datasets[d][s]["text"])


def test_stale_cache_is_rebuilt_with_a_message(tmp_path):
    """Re-preprocessing to the same file sizes (same sequence count and tokens) must not reuse the cache."""
    prefix = str(tmp_path / "s")
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 500, 20).tolist() for _ in range(60)]
    spec_write_dataset(prefix, seqs, list(range(61)), "uint16")
    cache = str(tmp_path / "cache")
    a = GPTDataset(prefix, (0, 60), 16, 100, seed=1, cache_dir=cache)
    assert a.built_indices
    sizes = (os.path.getsize(prefix + ".idx"), os.path.getsize(prefix + ".bin"))
    flat = [t for s in seqs for t in s]
    lengths = [5, 35] * 30  # same 1200 tokens in 60 sequences, other boundaries
    new, pos = [], 0
    for n in lengths:
        new.append(flat[pos : pos + n])
        pos += n
    spec_write_dataset(prefix, new, list(range(61)), "uint16")
    assert (os.path.getsize(prefix + ".idx"), os.path.getsize(prefix + ".bin")) == sizes
    with pytest.warns(
        UserWarning, match=r"train-description\.json is stale \(changed: index_sha1.*rebuilding"
    ):
        b = GPTDataset(prefix, (0, 60), 16, 100, seed=1, cache_dir=cache)
    assert b.built_indices and b.unique_hash == a.unique_hash
    fresh = GPTDataset(prefix, (0, 60), 16, 100, seed=1, cache_dir=str(tmp_path / "fresh"))
    np.testing.assert_array_equal(np.asarray(b.sample_index), np.asarray(fresh.sample_index))
    assert not GPTDataset(prefix, (0, 60), 16, 100, seed=1, cache_dir=cache).built_indices
    _check_windows(b)


def test_bad_token_id_at_a_late_sample(tmp_path):
    """Ids are bound-checked on every sample, against the tokenizer's vocabulary (not the padded one)."""
    prefix = str(tmp_path / "t")
    seqs = [[(7 * k + j) % 1000 for j in range(30)] for k in range(50)]
    seqs[46][12] = 1005  # inside a padded vocabulary of 1024, outside the tokenizer's 1000
    spec_write_dataset(prefix, seqs, [0, 10, 10, *range(11, 51)], "uint16")  # doc 1 empty, seq 46 = doc 38
    ds = GPTDataset(prefix, (0, 50), 16, 80, seed=0, cache_dir=str(tmp_path / "c"), vocab_size=1000)
    unchecked = GPTDataset(prefix, (0, 50), 16, 80, seed=0, cache_dir=str(tmp_path / "c"))
    bad = [i for i in range(len(ds)) if 1005 in unchecked[i]["text"]]
    assert bad and bad[0] > 0
    for i in range(len(ds)):
        if i in bad:
            with pytest.raises(
                DataError, match=r"t\.bin: token id 1005 in document 38 \(sequence 46, token 12"
            ):
                ds[i]
        else:
            np.testing.assert_array_equal(ds[i]["text"], unchecked[i]["text"])
    # the same through the builder
    train, _, _ = build_train_valid_test_datasets([prefix], "1", 16, (80, 0, 0), 0, str(tmp_path / "c"), 1000)
    with pytest.raises(DataError, match="token id 1005"):
        [train[i] for i in range(len(train))]


def test_zero_length_and_empty_documents(tmp_path):
    """Documents recorded without a sequence (Megatron's empty documents: repeated boundaries) and
    zero-length sequences (other writers) are skipped by the sample index; samples stay contiguous."""
    prefix = str(tmp_path / "z")
    rng = np.random.default_rng(2)
    seqs = [[] if k % 4 == 1 else rng.integers(0, 500, int(rng.integers(1, 30))).tolist() for k in range(80)]
    seqs[0], seqs[79] = [], []  # first and last too
    bounds = [0, 0, 1, 1, 1, *range(2, 81)]  # empty documents at the start and in a row
    spec_write_dataset(prefix, seqs, bounds, "uint16")
    reader = MMapIndexedDataset(prefix)
    assert reader.document_indices.tolist() == bounds
    for seq_length, num_samples in ((8, 500), (40, 30)):
        ds = GPTDataset(reader, (0, 80), seq_length, num_samples, seed=4, cache_dir=str(tmp_path / "c"))
        _check_windows(ds)
    train, _, _ = build_train_valid_test_datasets([prefix], "1", 8, (100, 0, 0), 4, str(tmp_path / "c"), 500)
    assert len(train) >= 100 and all(train[i]["text"].shape == (9,) for i in range(len(train)))
