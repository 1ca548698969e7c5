"""Tokenizer records (``PREFIX.meta.json``): written by preprocessing and merging, checked at start-up."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from megatron_cola.data import MMapIndexedDataset, SentencePieceTokenizer
from megatron_cola.data.merge import merge
from megatron_cola.data.preprocess import PreprocessConfig, preprocess
from megatron_cola.data.sidecar import (
    check_data_tokenizers,
    sidecar_path,
    tokenizer_model_digest,
    tokenizer_record,
)
from megatron_cola.errors import DataError
from megatron_cola.training.arguments import build_train_config, parse_args
from megatron_cola.training.data_setup import build_datasets

from .conftest import synthetic_args
from .test_data_common import make_docs, train_tiny_spm, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecar")
    small = train_tiny_spm(root / "small", vocab_size=400, seed=1)
    other = train_tiny_spm(root / "other", vocab_size=400, seed=2)  # same size, another model
    write_jsonl(root / "a.jsonl", make_docs(60, seed=1))
    write_jsonl(root / "b.jsonl", make_docs(40, seed=2))
    out = {"root": root, "small": small, "other": other}
    for name, model, src in (("a", small, "a.jsonl"), ("b", small, "b.jsonl"), ("c", other, "b.jsonl")):
        config = PreprocessConfig(
            input=(str(root / src),),
            output_prefix=str(root / "data" / name),
            tokenizer_type="GPTSentencePieceTokenizer" if name == "b" else "SentencePieceTokenizer",
            tokenizer_model=model,
            append_eod=True,
            partitions=2,
            quiet=True,
        )
        with contextlib.redirect_stdout(io.StringIO()):
            preprocess(config)
        out[name] = f"{config.output_prefix}_text_document"
    return out


def test_preprocess_writes_the_record(setup):
    prefix = setup["a"]
    record = json.loads(Path(prefix + ".meta.json").read_text())
    tok = SentencePieceTokenizer(setup["small"])
    assert record["tokenizer"] == {
        "type": "SentencePieceTokenizer",
        "model": setup["small"],
        "model_sha256": hashlib.sha256(Path(setup["small"]).read_bytes()).hexdigest(),
        "vocab_size": tok.vocab_size,
        "eod": tok.eod,
    }
    assert record["dtype"] == "uint16"
    flags = record["preprocess"]
    assert flags["append_eod"] is True and flags["partitions"] == 2 and flags["json_key"] == "text"
    assert flags["keep_sequential_samples"] is False and flags["input"] == [str(setup["root"] / "a.jsonl")]
    assert record["files"] == {
        "idx_sha1": hashlib.sha1(Path(prefix + ".idx").read_bytes()).hexdigest(),
        "bin_bytes": os.path.getsize(prefix + ".bin"),
    }
    assert not [f for f in os.listdir(Path(prefix).parent) if ".tmp" in f]


def test_startup_check(setup, tmp_path):
    def run_args(model: str) -> list[str]:
        argv = synthetic_args(setup["a"], "--train-iters", "2")
        i = argv.index("--tokenizer-type")
        argv[i + 1 : i + 2] = ["SentencePieceTokenizer", "--tokenizer-model", model]
        j = argv.index("--vocab-size")
        del argv[j : j + 2]
        return argv

    small, other = SentencePieceTokenizer(setup["small"]), SentencePieceTokenizer(setup["other"])
    cfg = build_train_config(parse_args(run_args(setup["small"])), 1)
    cfg_other = build_train_config(parse_args(run_args(setup["other"])), 1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train, _, _ = build_datasets(cfg, small.vocab_size, small.eod)
    assert train is not None and "note:" not in out.getvalue()
    with pytest.raises(DataError) as exc:
        build_datasets(cfg_other, other.vocab_size, other.eod)
    msg = str(exc.value)
    assert f"{setup['a']} was tokenized with SentencePieceTokenizer {setup['small']}" in msg
    assert f"this run uses SentencePieceTokenizer {setup['other']}" in msg and "differ in model_sha256" in msg

    # another vocabulary size and EOD (a record made by hand from the run's tokenizer, edited)
    run = tokenizer_record("SentencePieceTokenizer", setup["small"], small.vocab_size, small.eod)
    bigger = tokenizer_record("SentencePieceTokenizer", setup["small"], 32000, 7)
    with pytest.raises(DataError, match="differ in vocab_size, eod"):
        check_data_tokenizers([setup["a"]], bigger)
    # GPTSentencePieceTokenizer is SentencePieceTokenizer
    assert check_data_tokenizers([setup["a"], setup["b"]], run) == []

    # no record (Megatron's own data): one note; a stale record: a note; a corrupt one: an error
    bare = str(tmp_path / "bare")
    for ext in (".bin", ".idx"):
        shutil.copy(setup["a"] + ext, bare + ext)
    notes = check_data_tokenizers([setup["a"], bare], run)
    assert len(notes) == 1 and notes[0].startswith(f"note: no tokenizer record (.meta.json) for {bare} ")
    shutil.copy(setup["c"] + ".meta.json", sidecar_path(bare))
    notes = check_data_tokenizers([bare], run)
    assert len(notes) == 1 and "describes other .bin/.idx contents" in notes[0]
    Path(sidecar_path(bare)).write_text("{not json")
    with pytest.raises(DataError, match=r"bare\.meta\.json: unreadable dataset record"):
        check_data_tokenizers([bare], run)


def test_merge_carries_and_checks_records(setup, tmp_path):
    notes: list[str] = []
    merged = str(tmp_path / "ab")
    merge([setup["a"], setup["b"]], merged, notes)
    assert notes == []
    record = json.loads(Path(merged + ".meta.json").read_text())
    assert record["tokenizer"] == json.loads(Path(setup["a"] + ".meta.json").read_text())["tokenizer"]
    assert [m["prefix"] for m in record["preprocess"]["merged_from"]] == [setup["a"], setup["b"]]
    assert record["files"]["bin_bytes"] == os.path.getsize(merged + ".bin")
    run = tokenizer_record("SentencePieceTokenizer", setup["small"], record["tokenizer"]["vocab_size"], 2)
    assert check_data_tokenizers([merged], run) == []

    with pytest.raises(
        DataError, match=r"was tokenized with .* datasets made with different tokenizers cannot"
    ):
        merge([setup["a"], setup["c"]], str(tmp_path / "ac"))
    assert not list(tmp_path.glob("ac*"))

    bare = str(tmp_path / "bare")
    for ext in (".bin", ".idx"):
        shutil.copy(setup["b"] + ext, bare + ext)
    merge([setup["a"], bare], merged, notes)  # over the old output: its record goes
    assert len(notes) == 1 and f"no tokenizer record for {bare}" in notes[0]
    assert not os.path.exists(merged + ".meta.json")
    assert len(MMapIndexedDataset(merged)) == len(MMapIndexedDataset(setup["a"])) + len(
        MMapIndexedDataset(bare)
    )


def test_model_digest_of_a_hugging_face_directory(tmp_path):
    """A directory hashes its tokenizer files (name and bytes), never the weights beside them."""
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w" * 100)
    first = tokenizer_model_digest(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"v" * 100)
    assert tokenizer_model_digest(str(tmp_path)) == first
    (tmp_path / "tokenizer.json").write_text('{"model": 2}')
    assert tokenizer_model_digest(str(tmp_path)) != first
    single = tmp_path / "tokenizer.json"
    assert tokenizer_model_digest(str(single)) == hashlib.sha256(single.read_bytes()).hexdigest()
    assert tokenizer_model_digest(None) is None
