"""tools/preprocess_data.py and tools/merge_datasets.py end to end (run as subprocesses)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_cola.data import MMapIndexedDataset, SentencePieceTokenizer
from megatron_cola.data.preprocess import PreprocessConfig, preprocess

from .test_data_common import (
    TOOLS,
    make_docs,
    run_tool,
    spec_expected_idx_bytes,
    spec_read_dataset,
    tool_env,
    train_tiny_spm,
    write_jsonl,
)


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def megatron_order(n: int, partitions: int) -> list[int]:
    """The order Megatron-LM's preprocess_data.py writes ``n`` input lines in with ``--partitions P`` (no
    --keep-sequential-samples): line i is dealt to partition i % P (blank lines count), each partition
    keeps its lines in order, and the partitions are merged 0, 1, ..., P-1."""
    return [i for k in range(partitions) for i in range(k, n, partitions)]


def test_megatron_order_by_hand():
    # worked by hand from Megatron's loop `index = (index + 1) % args.partitions`
    assert megatron_order(10, 2) == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    assert megatron_order(10, 3) == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    assert megatron_order(3, 1) == [0, 1, 2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    model = train_tiny_spm(root)
    docs_a = make_docs(400, seed=21)
    docs_b = make_docs(120, seed=22)
    write_jsonl(root / "in" / "a.jsonl", docs_a)
    with gzip.open(root / "in" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs_b:
            f.write(json.dumps({"text": d}) + "\n")
    return {"root": root, "model": model, "docs": docs_a + docs_b, "docs_a": docs_a, "docs_b": docs_b}


@pytest.fixture(scope="module")
def round_trips(corpus):
    """Preprocess the corpus with workers x partitions in {1, 2}^2, and 2 x 2 --keep-sequential-samples."""
    out = {}
    for workers, partitions, sequential in ((1, 1, 0), (2, 1, 0), (1, 2, 0), (2, 2, 0), (2, 2, 1)):
        prefix = corpus["root"] / f"out_w{workers}_p{partitions}_s{sequential}" / "ds"
        proc = run_tool(
            "preprocess_data",
            "--input", str(corpus["root"] / "in" / "*.jsonl*"), "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["model"],
            "--append-eod", "--workers", workers, "--partitions", partitions, "--log-interval", 50,
            *(["--keep-sequential-samples"] if sequential else []),
        )  # fmt: skip
        out[(workers, partitions, sequential)] = (f"{prefix}_text_document", proc)
    return out


@pytest.mark.parametrize(
    "workers,partitions,sequential", [(1, 1, 0), (2, 1, 0), (1, 2, 0), (2, 2, 0), (2, 2, 1)]
)
def test_round_trip_matches_direct_tokenization(corpus, round_trips, workers, partitions, sequential):
    prefix, proc = round_trips[(workers, partitions, sequential)]
    tok = SentencePieceTokenizer(corpus["model"])
    docs = corpus["docs"]  # a.jsonl then b.jsonl.gz: the dealing runs on over both files
    order = range(len(docs)) if sequential else megatron_order(len(docs), partitions)
    expected = [tok.tokenize(docs[i]) + [tok.eod] for i in order]
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == len(expected)
    for i, exp in enumerate(expected):
        assert ds[i].tolist() == exp
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))
    # byte-for-byte what the spec (= Megatron's builder) gives for these ids
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == spec_expected_idx_bytes(
            [len(e) for e in expected], list(range(len(expected) + 1)), "uint16"
        )
    dtype, seqs, _ = spec_read_dataset(prefix)
    assert dtype == "uint16" and seqs == expected
    # progress bar rates and the summary line
    assert "B/s" in proc.stderr and "docs/s" in proc.stderr and "tok/s" in proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"done: {len(expected)} documents, {sum(map(len, expected))} tokens")
    assert "MB/s" in summary and "tokens/s" in summary
    assert _files(Path(prefix).parent) == [
        "ds_text_document.bin",
        "ds_text_document.idx",
        "ds_text_document.meta.json",
    ]


def test_round_trips_identical_where_megatron_is(round_trips):
    """The worker count never changes the bytes; the partition count does (Megatron's dealing) unless
    --keep-sequential-samples, which gives the --partitions 1 bytes."""

    def blob(key: tuple[int, int, int]) -> bytes:
        prefix = round_trips[key][0]
        return Path(prefix + ".bin").read_bytes() + Path(prefix + ".idx").read_bytes()

    assert blob((1, 1, 0)) == blob((2, 1, 0)) == blob((2, 2, 1))
    assert blob((1, 2, 0)) == blob((2, 2, 0)) != blob((1, 1, 0))


def test_partitions_deal_lines_like_megatron(tmp_path):
    """--partitions 2 --workers 2 against the order Megatron-LM writes, worked by hand: 9 lines over two
    files (the count runs on across files; the blank line takes its turn) -> 1 3 7 9 | 2 4 6 8."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in (1, 2, 3, 4)))
    (tmp_path / "b.jsonl").write_text(
        "\n" + "".join(json.dumps({"text": str(i)}) + "\n" for i in (6, 7, 8, 9))
    )
    got = {}
    for workers, partitions, sequential in ((2, 2, False), (1, 2, True), (3, 3, False)):
        config = PreprocessConfig(
            input=(str(tmp_path / "*.jsonl"),),
            output_prefix=str(tmp_path / "o"),
            tokenizer_type="NullTokenizer",
            vocab_size=10,
            workers=workers,
            partitions=partitions,
            keep_sequential_samples=sequential,
            quiet=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            preprocess(config)  # in-process: the same engine as the tool
        ds = MMapIndexedDataset(f"{config.output_prefix}_text_document")
        flags = f"--partitions {partitions}" + (
            " --keep-sequential-samples" if sequential else f" --workers {workers}"
        )
        got[flags] = [int(ds[i][0]) for i in range(len(ds))]
    # 0-based records: 1 2 3 4 | blank 6 7 8 9; even records 1 3 blank 7 9, odd 2 4 6 8
    assert got["--partitions 2 --workers 2"] == [1, 3, 7, 9, 2, 4, 6, 8]
    assert got["--partitions 2 --keep-sequential-samples"] == [1, 2, 3, 4, 6, 7, 8, 9]
    # records mod 3: 1 4 7 | 2 blank 8 | 3 6 9
    assert got["--partitions 3 --workers 3"] == [1, 4, 7, 2, 8, 3, 6, 9]


def test_merge_equals_single_run(corpus, round_trips, tmp_path):
    parts = []
    for name in ("a.jsonl", "b.jsonl.gz"):
        prefix = tmp_path / name.split(".")[0]
        run_tool(
            "preprocess_data", "--input", corpus["root"] / "in" / name, "--output-prefix", prefix,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus["model"],
            "--append-eod",
        )  # fmt: skip
        parts.append(f"{prefix}_text_document")
    single = round_trips[(1, 1, 0)][0]
    run_tool("merge_datasets", "--input", *parts, "--output-prefix", tmp_path / "merged" / "m")
    os.makedirs(tmp_path / "shards")
    for k, p in enumerate(parts):
        for ext in (".bin", ".idx"):
            os.link(p + ext, tmp_path / "shards" / f"{k:02d}{ext}")
    run_tool("merge_datasets", "--input-dir", tmp_path / "shards", "--output-prefix", tmp_path / "merged2")
    run_tool("merge_datasets", "--input", tmp_path / "shards", "--output-prefix", tmp_path / "merged3")
    for merged in (tmp_path / "merged" / "m", tmp_path / "merged2", tmp_path / "merged3"):
        for ext in (".bin", ".idx"):
            assert Path(f"{merged}{ext}").read_bytes() == Path(single + ext).read_bytes()

    other = tmp_path / "wide"
    write_jsonl(tmp_path / "ints.jsonl", ["1 2 3"])
    run_tool("preprocess_data", "--input", tmp_path / "ints.jsonl", "--output-prefix", other,
             "--tokenizer-type", "NullTokenizer", "--vocab-size", "100000")  # fmt: skip
    bad = run_tool("merge_datasets", "--input", parts[0], f"{other}_text_document", "--output-prefix",
                   tmp_path / "x", check=False)  # fmt: skip
    assert bad.returncode == 1 and "int32" in bad.stderr and "uint16" in bad.stderr
    assert not list(tmp_path.glob("x*"))


BAD_LINES = [
    (b'{"text": "1 2 3"}', None),
    (b'{"text": "4 5"', "not valid JSON"),
    (b'{"body": "1"}', "missing key 'text'"),
    (b'{"text": "caf\xe9 7"}', "not valid UTF-8"),
    (b"[1, 2]", "JSON list instead of an object"),
    (b'{"text": 5}', "holds a int, expected a string"),
    (b"", None),  # blank line: ignored
    (b'{"text": "6 x 7"}', "tokenizer failed"),
    (b'{"text": ""}', None),  # empty document: recorded without a sequence
    (b'{"text": "8 9"}', None),
]


def _write_bad_file(path: Path, repeat: int = 1) -> list[tuple[int, str]]:
    expected_bad = []
    lines = []
    for r in range(repeat):
        for k, (line, reason) in enumerate(BAD_LINES):
            lines.append(line)
            if reason:
                expected_bad.append((r * len(BAD_LINES) + k + 1, reason))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected_bad


@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 2)])
def test_bad_lines_reported_skipped_and_counted(tmp_path, workers, partitions):
    src = tmp_path / "bad.jsonl"
    expected_bad = _write_bad_file(src, repeat=30)
    prefix = tmp_path / "out"
    proc = run_tool(
        "preprocess_data", "--input", src, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "1000", "--append-eod", "--workers", workers, "--partitions", partitions,
    )  # fmt: skip
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning: ") and f"{src}:" in ln]
    assert len(warned) == 50  # the first 50 are printed, the rest counted
    reasons = dict(expected_bad)
    for msg in warned:  # parallel partitions may report out of order
        line_no = int(msg.split(f"{src}:")[1].split(":")[0])
        assert reasons[line_no] in msg, msg
    if partitions == 1:
        assert [int(m.split(f"{src}:")[1].split(":")[0]) for m in warned] == [n for n, _ in expected_bad[:50]]
    assert f"skipped {len(expected_bad)} bad lines, recorded 30 empty documents" in proc.stdout
    ds = MMapIndexedDataset(f"{prefix}_text_document")
    assert len(ds) == 60
    if partitions == 1:
        assert [ds[i].tolist() for i in range(3)] == [[1, 2, 3, 1000], [8, 9, 1000], [1, 2, 3, 1000]]
        # per repeat: documents "1 2 3", "" (no sequence), "8 9" -> boundaries 0, 1, 1, 2, 3, 3, 4, ...
        assert ds.document_indices.tolist() == [0] + [
            x for r in range(30) for x in (2 * r + 1, 2 * r + 1, 2 * r + 2)
        ]
    else:  # records 10r and 10r + 8 ("1 2 3", "") go to partition 0, records 10r + 9 ("8 9") to partition 1
        assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2, 3, 1000]] * 30 + [[8, 9, 1000]] * 30
        assert ds.document_indices.tolist() == [0] + [x for r in range(30) for x in (r + 1, r + 1)] + list(
            range(31, 61)
        )


def test_strict_fails_cleanly(tmp_path):
    src = tmp_path / "bad.jsonl"
    _write_bad_file(src)
    prefix = tmp_path / "out" / "ds"
    proc = run_tool(
        "preprocess_data", "--input", src, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "1000", "--strict", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"{src}:2: not valid JSON" in proc.stderr and "--strict" in proc.stderr
    assert _files(prefix.parent) == []  # nothing, not even temporaries
    proc = run_tool(
        "preprocess_data", "--input", src, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "1000", "--strict", "--workers", "2", "--partitions", "2", check=False,
    )  # fmt: skip
    # With parallel partitions whichever bad line a worker meets first stops the run.
    assert proc.returncode == 1
    assert re.search(rf"{re.escape(str(src))}:\d+: .*--strict: stopping", proc.stderr)
    assert _files(prefix.parent) == []


def test_multiple_keys_empty_docs_and_dtype(tmp_path):
    src = tmp_path / "kv.jsonl"
    rows = [{"text": "1 2", "title": "7"}, {"text": "", "title": "8 9"}, {"text": "3", "title": ""}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "kv"
    proc = run_tool(
        "preprocess_data", "--input", src, "--output-prefix", prefix, "--json-keys", "text", "title",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "70000", "--append-eod",
    )  # fmt: skip
    assert "recorded 2 empty documents" in proc.stdout
    text = MMapIndexedDataset(f"{prefix}_text_document")
    title = MMapIndexedDataset(f"{prefix}_title_document")
    assert text.dtype == np.int32  # vocab 70001 >= 65500
    assert [text[i].tolist() for i in range(len(text))] == [[1, 2, 70000], [3, 70000]]
    assert [title[i].tolist() for i in range(len(title))] == [[7, 70000], [8, 9, 70000]]
    # Megatron's layout: an empty document is a repeated boundary (no sequence, no EOD)
    assert text.document_indices.tolist() == [0, 1, 1, 2]
    assert title.document_indices.tolist() == [0, 1, 2, 2]
    with open(f"{prefix}_text_document.idx", "rb") as f:
        assert f.read() == spec_expected_idx_bytes([3, 2], [0, 1, 1, 2], "int32")


def test_interrupted_run_leaves_no_valid_pair(tmp_path):
    src = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    with open(src, "w") as f:
        for _ in range(60_000):
            f.write(json.dumps({"text": " ".join(map(str, rng.integers(0, 1000, 24)))}) + "\n")
    out = tmp_path / "out"
    prefix = out / "ds"
    runs = [(signal.SIGKILL, 1), (signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGTERM, 2)]
    for sig, parallel in runs:  # parallel=2: a pool of two workers in each of two partition processes
        proc = subprocess.Popen(
            [sys.executable, str(TOOLS / "preprocess_data.py"), "--input", str(src),
             "--output-prefix", str(prefix), "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
             "--append-eod", "--quiet", "--workers", str(parallel * parallel), "--partitions", str(parallel)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(),
        )  # fmt: skip
        deadline = time.time() + 60
        while not any(".tmp-" in f for f in (os.listdir(out) if out.exists() else [])):
            assert proc.poll() is None and time.time() < deadline, (
                "preprocess ended before it could be interrupted"
            )
            time.sleep(0.005)
        time.sleep(0.2)
        if proc.poll() is not None:
            pytest.skip("preprocess finished before the signal")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert not (out / "ds_text_document.idx").exists() and not (out / "ds_text_document.bin").exists()
        if sig in (signal.SIGINT, signal.SIGTERM):
            assert proc.returncode == 128 + sig and "interrupted" in err, err
            assert "Traceback" not in err
            assert _files(out) == []  # temporaries cleaned up
        else:
            assert all(".tmp-" in f for f in _files(out))
            for f in _files(out):
                os.remove(out / f)


def test_input_errors(tmp_path):
    proc = run_tool(
        "preprocess_data", "--input", tmp_path / "nope*.jsonl", "--output-prefix", tmp_path / "o",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "10", check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "matches no files" in proc.stderr
    proc = run_tool(
        "preprocess_data", "--input", tmp_path / "x.jsonl", "--output-prefix", tmp_path / "o",
        "--tokenizer-type", "NullTokenizer", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--vocab-size" in proc.stderr
    src = write_jsonl(tmp_path / "ok.jsonl", ["1 2"])
    (tmp_path / "afile").write_text("")
    for tool, args in (
        ("preprocess_data", ["--input", src, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]),
        ("train_tokenizer", ["--input", src, "--vocab-size", "5000"]),
    ):
        flag = "--output-prefix" if tool == "preprocess_data" else "--model-prefix"
        proc = run_tool(tool, *args, flag, tmp_path / "afile" / "o", check=False)
        assert proc.returncode == 1 and "error: " in proc.stderr and "Traceback" not in proc.stderr, (
            proc.stderr
        )


@pytest.mark.parametrize("workers,partitions", [(1, 1), (2, 2)])
def test_empty_documents_byte_identical_to_megatron_layout(tmp_path, workers, partitions):
    """Empty documents anywhere (first, last, in a row, across a partition cut) give the document
    boundaries Megatron's builder writes: add_document(ids, lengths=[]) repeats the boundary."""
    texts = ["", "1 2", "", "", "3", "4 5 6", "", "7", ""] * 40
    src = tmp_path / "e.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = tmp_path / "o"
    proc = run_tool(
        "preprocess_data", "--input", src, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "100", "--append-eod", "--workers", workers, "--partitions", partitions, "--quiet",
    )  # fmt: skip
    lengths, bounds = [], [0]
    for t in (texts[i] for i in megatron_order(len(texts), partitions)):
        # Megatron: ids + EOD for a non-empty document, nothing for an empty one
        if t:
            lengths.append(len(t.split()) + 1)
        bounds.append(len(lengths))
    assert Path(f"{prefix}_text_document.idx").read_bytes() == spec_expected_idx_bytes(
        lengths, bounds, "uint16"
    )
    assert f"done: {len(texts)} documents" in proc.stdout and "recorded 200 empty documents" in proc.stdout


def test_empty_result_is_an_error_unless_allowed(tmp_path):
    src = tmp_path / "blank.jsonl"
    src.write_text('\n{"text": "x"\n\n')  # a blank line, a bad line: no documents
    prefix = tmp_path / "out" / "ds"
    args = [
        "--input",
        src,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "10",
    ]
    proc = run_tool("preprocess_data", *args, check=False)
    assert proc.returncode == 1 and "no documents" in proc.stderr and "--allow-empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(prefix.parent) == []
    src.write_text('{"text": ""}\n')  # one document, no tokens
    proc = run_tool("preprocess_data", *args, check=False)
    assert proc.returncode == 1 and "are empty" in proc.stderr and _files(prefix.parent) == []
    proc = run_tool("preprocess_data", *args, "--allow-empty")
    ds = MMapIndexedDataset(f"{prefix}_text_document")
    assert len(ds) == 0 and ds.document_indices.tolist() == [0, 0]


def test_wrong_json_key_suggests_the_key_and_quiet_caps_the_warnings(tmp_path, capsys):
    """A JSONL whose text is under another key: --quiet prints the first MAX_REPORTED_BAD_LINES bad lines
    and one note, and the error names the keys found and the --json-keys to pass."""
    from megatron_cola.data.preprocess_report import MAX_REPORTED_BAD_LINES
    from megatron_cola.errors import DataError

    lines = [{"id": i, "content": f"{i} {i + 1} 7", "url": f"u{i}"} for i in range(80)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    config = PreprocessConfig(
        input=(str(tmp_path / "c.jsonl"),),
        output_prefix=str(tmp_path / "o"),
        tokenizer_type="NullTokenizer",
        vocab_size=100,
        quiet=True,
    )
    with pytest.raises(DataError) as e:
        preprocess(config)
    assert "no documents (0 blank lines, 80 bad lines; no line has key 'text'; the lines hold keys " in str(
        e.value
    )
    assert "content, id, url: pass --json-keys content)" in str(e.value)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == MAX_REPORTED_BAD_LINES + 1 < 80
    assert (
        err[0]
        == f"warning: {tmp_path / 'c.jsonl'}:1: missing key 'text' (keys: id, content, url) (line skipped)"
    )
    assert err[-1] == "warning: more bad lines; only the count is reported from now on"
    with contextlib.redirect_stdout(io.StringIO()):
        preprocess(PreprocessConfig(**{**config.__dict__, "json_keys": ("content",)}))
    assert len(MMapIndexedDataset(f"{config.output_prefix}_content_document")) == 80


def test_truncated_gzip_names_the_file(tmp_path):
    src = tmp_path / "c.jsonl.gz"
    with gzip.open(src, "wt") as f:
        for i in range(3000):
            f.write(json.dumps({"text": f"{i % 90} {i % 7}"}) + "\n")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    plain = write_jsonl(tmp_path / "plain.jsonl", [f"{i} 1" for i in range(2000)])
    prefix = tmp_path / "out" / "ds"
    for workers, partitions in ((1, 1), (2, 2)):
        proc = run_tool(
            "preprocess_data", "--input", plain, src, "--output-prefix", prefix, "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "100000", "--workers", workers, "--partitions", partitions,
            "--quiet", check=False,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert f"{src}: truncated or corrupt gzip file" in proc.stderr and "Traceback" not in proc.stderr
        assert _files(prefix.parent) == []
