"""Tokenizers (SentencePiece, Hugging Face, Null), the factory, and tools/train_tokenizer.py."""

from __future__ import annotations

import os
import pickle

import pytest

from megatron_cola.data.tokenizers import (
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

from .test_data_common import make_docs, run_tool, train_tiny_spm, write_jsonl


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


def test_sentencepiece_round_trip(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    assert tok.vocab_size == 400
    assert tok.eod == 2 and tok.bos == 1
    for text in make_docs(20, seed=5) + ["tabs\tand  double  spaces\n\nand 🦜 unseen émoji"]:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids
        assert tok.detokenize(ids) == text  # identity normalisation + byte fallback: lossless
    texts = make_docs(7, seed=9)
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(texts[0]) == tok.tokenize(texts[0])


def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert tok.vocab_size == 101 and tok.eod == 100
    assert tok.tokenize("1 2  99\n3") == [1, 2, 99, 3]
    assert tok.tokenize("") == []
    assert tok.detokenize([4, 5]) == "4 5"
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("100")
    with pytest.raises(ValueError, match="integers"):
        tok.tokenize("1 x")


def test_huggingface_tokenizer_file_and_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False
    )
    raw.train_from_iterator(make_docs(200, seed=3), trainer)
    path = str(tmp_path / "tokenizer.json")
    raw.save(path)

    from_file = HuggingFaceTokenizer(path)
    assert from_file.eod == raw.token_to_id("<|endoftext|>")
    text = "the first time 42"
    assert from_file.tokenize(text) == raw.encode(text).ids
    assert from_file.vocab_size == raw.get_vocab_size()

    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    hf.save_pretrained(str(tmp_path / "hfdir"))
    from_dir = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hfdir"))
    assert from_dir.tokenize(text) == raw.encode(text).ids
    assert from_dir.eod == hf.eos_token_id
    assert from_dir.tokenize_batch([text, "two"]) == [raw.encode(text).ids, raw.encode("two").ids]


def test_build_tokenizer_errors(spm_model):
    with pytest.raises(
        ValueError, match="allowed: .*HuggingFaceTokenizer.*NullTokenizer.*SentencePieceTokenizer"
    ):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(FileNotFoundError):
        build_tokenizer("SentencePieceTokenizer", "/nonexistent/x.model")
    assert isinstance(build_tokenizer("SentencePieceTokenizer", spm_model), SentencePieceTokenizer)
    assert build_tokenizer("NullTokenizer", vocab_size=10).eod == 10


def test_train_tokenizer_cli(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(150, seed=11), key="body")
    prefix = tmp_path / "out" / "tok"
    proc = run_tool(
        "train_tokenizer",
        "--input", corpus, "--vocab-size", "320", "--model-prefix", prefix, "--json-key", "body",
        "--no-byte-fallback", "--character-coverage", "1.0",
    )  # fmt: skip
    assert "wrote" in proc.stdout
    assert os.path.isfile(f"{prefix}.model") and os.path.isfile(f"{prefix}.vocab")
    assert not [f for f in os.listdir(prefix.parent) if ".tmp" in f]
    tok = SentencePieceTokenizer(f"{prefix}.model")
    assert tok.vocab_size == 320
    assert "<0x0A>" not in open(f"{prefix}.vocab", encoding="utf-8").read()  # no byte pieces
    # a vocabulary the corpus cannot fill is a clear failure, not a crash
    bad = run_tool("train_tokenizer", "--input", corpus, "--vocab-size", "100000", "--model-prefix",
                   tmp_path / "big", check=False)  # fmt: skip
    assert bad.returncode == 1 and "error" in bad.stderr.lower()
    assert not os.path.exists(tmp_path / "big.model")
