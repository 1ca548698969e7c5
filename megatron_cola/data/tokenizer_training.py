"""Training a SentencePiece tokenizer (BPE by default, LLaMA-style settings) from JSONL text; the engine of
``tools/train_tokenizer.py``.

Every non-empty line of every document's ``json_key`` field is one training sentence (SentencePiece skips
sentences longer than ``max_sentence_length`` bytes, so whole documents are not fed). Defaults follow
LLaMA's tokenizer: identity normalisation, whitespace kept, digits split, byte fallback, ids
``<unk>=0 <s>=1 </s>=2`` (``</s>`` is the end-of-document id). ``P.model`` and ``P.vocab`` are written under
temporary names and renamed when complete.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator

from megatron_cola.atomic_io import atomic_open
from megatron_cola.errors import DataError

__all__ = ["iter_sentences", "train_tokenizer"]


def iter_sentences(paths: list[str], json_key: str) -> Iterator[str]:
    """Non-empty lines of the ``json_key`` text of every JSONL record (bad records are skipped)."""
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    text = json.loads(line)[json_key]
                except (ValueError, KeyError, TypeError):
                    continue
                if not isinstance(text, str):
                    continue
                for sentence in text.split("\n"):
                    if sentence.strip():
                        yield sentence


def train_tokenizer(
    inputs: list[str],
    model_prefix: str,
    vocab_size: int,
    json_key: str = "text",
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    hard_vocab_limit: bool = True,
    input_sentence_size: int = 0,
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
    normalization_rule_name: str = "identity",
) -> str:
    """Train and write ``{model_prefix}.model`` / ``.vocab`` atomically; returns the model path."""
    import sentencepiece as spm

    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"--input {path!r}: no such file")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--model-prefix {model_prefix!r}: cannot create {out_dir} ({exc.strerror})") from exc
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_sentences(inputs, json_key),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            hard_vocab_limit=hard_vocab_limit,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            normalization_rule_name=normalization_rule_name,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. a vocabulary the corpus cannot fill
        raise DataError(f"SentencePiece could not train on {', '.join(inputs)}: {exc}") from exc
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    vocab_lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())]

    model_path, vocab_path = model_prefix + ".model", model_prefix + ".vocab"
    try:  # temporary name beside each file, renamed when complete; the .model (what readers look for) last
        with atomic_open(vocab_path, "w") as f:
            f.writelines(vocab_lines)
        with atomic_open(model_path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise DataError(
            f"--model-prefix {model_prefix!r}: cannot write {exc.filename} ({exc.strerror})"
        ) from exc
    return model_path
