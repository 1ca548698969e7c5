#!/usr/bin/env python
"""Train a SentencePiece tokenizer (BPE by default, LLaMA-style settings) from JSONL text.

    python tools/train_tokenizer.py --input data/sample/train.jsonl --vocab-size 32000 \\
        --model-prefix data/tokenizer/sample_32k

Every non-empty line of every document's ``--json-key`` field is one training sentence (SentencePiece
skips sentences longer than ``--max-sentence-length`` bytes, so whole documents are not fed). Defaults
follow LLaMA's tokenizer: identity normalisation, whitespace kept, digits split, byte fallback, ids
``<unk>=0 <s>=1 </s>=2`` (``</s>`` is the end-of-document id). ``P.model`` and ``P.vocab`` are written under
temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator


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


def train(
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
            raise FileNotFoundError(f"input {path!r} not found")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
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
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    vocab_lines = [f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())]

    pid = os.getpid()
    model_path, vocab_path = model_prefix + ".model", model_prefix + ".vocab"
    with open(f"{model_path}.tmp-{pid}", "wb") as f:
        f.write(data)
    with open(f"{vocab_path}.tmp-{pid}", "w", encoding="utf-8") as f:
        f.writelines(vocab_lines)
    os.replace(f"{vocab_path}.tmp-{pid}", vocab_path)
    os.replace(f"{model_path}.tmp-{pid}", model_path)
    return model_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a SentencePiece tokenizer from JSONL text.")
    p.add_argument("--input", nargs="+", required=True, help="JSONL (or .jsonl.gz) files")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--hard-vocab-limit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fail when the corpus cannot fill --vocab-size (--no-hard-vocab-limit: a soft limit)",
    )
    p.add_argument("--input-sentence-size", type=int, default=0, help="sample this many sentences (0: all)")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines (bytes) are skipped")
    p.add_argument("--normalization-rule-name", default="identity", help="identity (LLaMA) or nmt_nfkc, ...")
    p.add_argument("--num-threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.vocab_size < 8:
        p.error("--vocab-size is too small")
    try:
        path = train(
            args.input,
            args.model_prefix,
            args.vocab_size,
            json_key=args.json_key,
            model_type=args.model_type,
            byte_fallback=args.byte_fallback,
            character_coverage=args.character_coverage,
            hard_vocab_limit=args.hard_vocab_limit,
            input_sentence_size=args.input_sentence_size,
            max_sentence_length=args.max_sentence_length,
            num_threads=args.num_threads,
            normalization_rule_name=args.normalization_rule_name,
        )
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (vocab {args.vocab_size}, {args.model_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
