"""Parquet, Arrow and `datasets` save_to_disk inputs of the preprocessing engine (in-process).

The reference is the JSONL path: the same texts written as JSONL give the expected ``.bin/.idx`` bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_cola.data import MMapIndexedDataset
from megatron_cola.data.preprocess import PreprocessConfig, StrictError, preprocess
from megatron_cola.errors import DataError

from .test_data_common import make_docs, train_tiny_spm


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Documents with newlines, non-ASCII text and empty ones, as JSONL, Parquet and Arrow files."""
    root = tmp_path_factory.mktemp("columnar")
    model = train_tiny_spm(root)
    docs = make_docs(230, seed=5)
    for i in (0, 17, 18, 229):
        docs[i] = ""
    titles = [f"title {i} 東京" for i in range(len(docs))]
    with open(root / "all.jsonl", "w", encoding="utf-8") as f:
        for d, t in zip(docs, titles):
            f.write(json.dumps({"text": d, "title": t}, ensure_ascii=False) + "\n")
    os.makedirs(root / "pq")
    # two files (a glob), several row groups of unequal size, an extra column
    for name, lo, hi in (("part-0.parquet", 0, 150), ("part-1.parquet", 150, len(docs))):
        table = pa.table({"id": list(range(lo, hi)), "text": docs[lo:hi], "title": titles[lo:hi]})
        pq.write_table(table, root / "pq" / name, row_group_size=37)
    # an Arrow IPC stream (the format `datasets` writes) in a save_to_disk-style directory
    os.makedirs(root / "saved")
    schema = pa.schema([("text", pa.large_string()), ("title", pa.string())])
    for k, (lo, hi) in enumerate(((0, 100), (100, len(docs)))):
        with pa.ipc.new_stream(root / "saved" / f"data-{k:05d}-of-00002.arrow", schema) as w:
            for a in range(lo, hi, 33):
                b = min(hi, a + 33)
                w.write_batch(
                    pa.record_batch([pa.array(docs[a:b], pa.large_string()), titles[a:b]], schema=schema)
                )
    names = [{"filename": f"data-{k:05d}-of-00002.arrow"} for k in range(2)]
    (root / "saved" / "state.json").write_text(json.dumps({"_data_files": names}))
    (root / "saved" / "dataset_info.json").write_text("{}")
    return {"root": root, "model": model, "docs": docs}


def _run(texts, inputs, name, **kw) -> str:
    kw.setdefault("json_keys", ("text",))
    config = PreprocessConfig(
        input=tuple(str(i) for i in inputs),
        output_prefix=str(texts["root"] / "out" / name),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=texts["model"],
        append_eod=True,
        quiet=True,
        **kw,
    )
    preprocess(config)
    return config.output_prefix


def _blob(prefix: str) -> bytes:
    return Path(prefix + ".bin").read_bytes() + Path(prefix + ".idx").read_bytes()


@pytest.mark.parametrize("workers,partitions,sequential", [(1, 1, False), (2, 2, False), (2, 2, True)])
def test_columnar_output_equals_jsonl(texts, workers, partitions, sequential):
    kw = {"workers": workers, "partitions": partitions, "keep_sequential_samples": sequential}
    tag = f"w{workers}p{partitions}s{int(sequential)}"
    ref = _run(texts, [texts["root"] / "all.jsonl"], f"jsonl_{tag}", json_keys=("text", "title"), **kw)
    pq_out = _run(texts, [texts["root"] / "pq" / "*.parquet"], f"pq_{tag}", json_keys=("text", "title"), **kw)
    arrow_out = _run(texts, [texts["root"] / "saved"], f"arrow_{tag}", json_keys=("text", "title"), **kw)
    for key in ("text", "title"):
        expected = _blob(f"{ref}_{key}_document")
        assert _blob(f"{pq_out}_{key}_document") == expected
        assert _blob(f"{arrow_out}_{key}_document") == expected
    ds = MMapIndexedDataset(f"{pq_out}_text_document")
    assert len(ds.document_indices) - 1 == len(texts["docs"])


def test_real_datasets_save_to_disk(texts):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_dict({"text": texts["docs"], "n": list(range(len(texts["docs"])))})
    d.save_to_disk(str(texts["root"] / "hf"), max_shard_size="20KB")
    assert len(list((texts["root"] / "hf").glob("data-*.arrow"))) > 1
    ref = _run(texts, [texts["root"] / "all.jsonl"], "hf_ref", partitions=2, workers=2)
    out = _run(texts, [texts["root"] / "hf"], "hf", partitions=2, workers=2)
    assert _blob(f"{out}_text_document") == _blob(f"{ref}_text_document")


def test_parquet_partitions_deal_rows_like_megatron(tmp_path):
    """Rows are dealt out in turn over all files, as Megatron deals JSONL lines: 1 3 5 7 9 | 2 4 6 8."""
    pq.write_table(pa.table({"text": ["1", "2", "3", "4"]}), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"text": ["5", "6", "7", "8", "9"]}), tmp_path / "b.parquet", row_group_size=2)
    got = {}
    for sequential in (False, True):
        config = PreprocessConfig(
            input=(str(tmp_path / "*.parquet"),),
            output_prefix=str(tmp_path / f"o{int(sequential)}"),
            tokenizer_type="NullTokenizer",
            vocab_size=10,
            workers=2,
            partitions=2,
            keep_sequential_samples=sequential,
            quiet=True,
        )
        preprocess(config)
        ds = MMapIndexedDataset(f"{config.output_prefix}_text_document")
        got[sequential] = [int(ds[i][0]) for i in range(len(ds))]
    assert got[False] == [1, 3, 5, 7, 9, 2, 4, 6, 8]
    assert got[True] == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def _null_cfg(path, tmp_path, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        input=(str(path),),
        output_prefix=str(tmp_path / "out" / "ds"),
        tokenizer_type="NullTokenizer",
        vocab_size=100,
        quiet=True,
        **kw,
    )


def test_bad_columnar_input(tmp_path, capsys):
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["1 2"], "n": [3]}), src)
    with pytest.raises(
        DataError, match=r"bad\.parquet: no column 'text' \(columns: body \(string\), n \(int64\)\)"
    ):
        preprocess(_null_cfg(src, tmp_path))
    with pytest.raises(DataError, match=r"column 'n' holds int64 values .* pass --json-keys"):
        preprocess(_null_cfg(src, tmp_path, json_keys=("n",)))

    # a null value: skipped like a JSONL line whose key holds null, with the row and row group named
    pq.write_table(pa.table({"text": ["1 2", None, "3", "4", None]}), src, row_group_size=2)
    summary = preprocess(_null_cfg(src, tmp_path))
    err = capsys.readouterr().err
    assert (
        f"warning: {src}: row 1 (row group 0): column 'text' is null, expected a string (row skipped)" in err
    )
    assert f"{src}: row 4 (row group 2)" in err
    assert summary["documents"] == 3 and summary["bad_lines"] == 2
    with pytest.raises(StrictError, match=r"bad\.parquet: row 1 \(row group 0\): column 'text' is null"):
        preprocess(_null_cfg(src, tmp_path, strict=True))
    shutil.rmtree(tmp_path / "out")

    # truncated: the footer is gone
    pq.write_table(pa.table({"text": [str(i) for i in range(3000)]}), src, row_group_size=500)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"bad\.parquet: cannot be read, the file is truncated or corrupt"):
        preprocess(_null_cfg(src, tmp_path))
    # a damaged row group: named
    pq.write_table(
        pa.table({"text": [f"{i % 97} {i % 13}" for i in range(3000)]}),
        src,
        row_group_size=1000,
        compression="snappy",
    )
    meta = pq.ParquetFile(src).metadata
    col = meta.row_group(1).column(0)
    data = bytearray(src.read_bytes())
    start = col.data_page_offset + 40
    data[start : start + 200] = b"\xff" * 200
    src.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.parquet: row group 1: cannot be read, the file is truncated"):
        preprocess(_null_cfg(src, tmp_path))
    assert os.listdir(tmp_path / "out") == []  # no temporaries left


def test_bad_arrow_and_directories(tmp_path):
    src = tmp_path / "d.arrow"
    schema = pa.schema([("text", pa.string())])
    with pa.ipc.new_stream(src, schema) as w:
        for i in range(5):
            w.write_batch(pa.record_batch([[f"{i} {j}" for j in range(200)]], schema=schema))
    data = src.read_bytes()
    src.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(
        DataError, match=r"d\.arrow: record batch [23]: cannot be read, the file is truncated"
    ):
        preprocess(_null_cfg(src, tmp_path))

    (tmp_path / "dd" / "train").mkdir(parents=True)
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(
        DataError, match=r"saved DatasetDict; name one split's directory, e\.g\. --input .*train"
    ):
        preprocess(_null_cfg(tmp_path / "dd", tmp_path))
    with pytest.raises(DataError, match=r"without state\.json .* DIR/\*\.parquet"):
        preprocess(_null_cfg(tmp_path / "dd" / "train", tmp_path))


def test_arrow_file_format_and_dictionary_columns(tmp_path):
    """The Arrow IPC file format (not only `datasets`' stream format) and dictionary-encoded string
    columns give the JSONL bytes."""
    texts = ["1 2", "3", "", "4 5 6", "7"] * 3
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    table = pa.table({"text": pa.array(texts).dictionary_encode()})
    with pa.ipc.new_file(tmp_path / "t.arrow", table.schema) as w:
        w.write_table(table, max_chunksize=4)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=6)
    blobs = set()
    for name in ("t.jsonl", "t.arrow", "t.parquet"):
        config = _null_cfg(tmp_path / name, tmp_path, partitions=2)
        config = dataclasses.replace(config, output_prefix=str(tmp_path / name.replace(".", "_")))
        preprocess(config)
        blobs.add(_blob(f"{config.output_prefix}_text_document"))
    assert len(blobs) == 1
