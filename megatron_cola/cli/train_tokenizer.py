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
import sys

from megatron_cola.data.tokenizer_training import train_tokenizer as train
from megatron_cola.errors import MegatronColaError

__all__ = ["main", "train"]


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
    except MegatronColaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} (vocab {args.vocab_size}, {args.model_type})")
    return 0
