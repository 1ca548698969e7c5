"""Tokenize JSONL / Parquet documents into Megatron ``.bin/.idx`` datasets (Megatron-LM's flags and output).

    python tools/preprocess_data.py --input data/sample/train.jsonl --output-prefix data/sample/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample_32k.model \\
        --append-eod --workers 2

Writes ``{output-prefix}_{key}_document.bin/.idx`` for every ``--json-keys`` key, MMIDIDX v1, uint16 tokens
when the vocabulary is below 65500 else int32, byte-for-byte what Megatron-LM's builder writes for the same
ids, and beside each its tokenizer record ``.meta.json`` (checked at training start-up). ``--input`` takes
``.jsonl``/``.jsonl.gz`` files (one JSON object per line), ``.parquet`` and ``.arrow`` files (read with
pyarrow a row group at a time; ``--json-keys`` names the columns), Hugging Face ``datasets``
``save_to_disk`` directories, and globs; a Parquet row gives the bytes the JSONL line with the same string
gives.

* Bad lines (not UTF-8, not JSON, not an object, a key missing or not a string, tokenizer error) are
  reported as ``file:line: reason``, skipped and counted; ``--strict`` makes the first one fatal (exit 1).
* Documents that tokenize to nothing are recorded as Megatron records them (a document with no sequence,
  no EOD) and counted; a run that yields no tokens at all is an error unless ``--allow-empty``.
* ``--workers N`` tokenizes in N processes (``--workers 1`` runs in-process); order is always the input
  order, so the output does not depend on the worker count.
* ``--partitions P`` runs P parallel processes with ``workers // P`` workers each and writes their parts
  one after another. As in Megatron-LM, records are dealt out in turn (record i to part i % P), so P=2
  writes the even records, then the odd ones; ``--keep-sequential-samples`` cuts the input into
  contiguous parts instead, giving the P=1 bytes.
* Outputs are written under temporary names and renamed when complete (``.idx`` last), so an interrupted
  run never leaves a pair that looks valid; Ctrl-C and SIGTERM remove the temporaries.

The engine is :mod:`megatron_cola.data.preprocess`; this file is its command line.

Without ``--split-sentences`` (not supported here, as in Megatron's default GPT path) every document is
tokenized whole, newlines included; ``--keep-newlines`` is accepted for command-line compatibility.
"""

from __future__ import annotations

import argparse
import sys

from megatron_cola.data.preprocess import (
    PreprocessConfig,
    StrictError,
    Terminated,
    preprocess,
    sigterm_as_interrupt,
)
from megatron_cola.data.tokenizers import TOKENIZER_TYPES
from megatron_cola.errors import MegatronColaError


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """The engine's configuration from parsed flags."""
    return PreprocessConfig(
        input=tuple(args.input),
        output_prefix=args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
        json_keys=tuple(args.json_keys),
        append_eod=args.append_eod,
        workers=args.workers,
        partitions=args.partitions,
        keep_sequential_samples=args.keep_sequential_samples,
        strict=args.strict,
        allow_empty=args.allow_empty,
        log_interval=args.log_interval,
        quiet=args.quiet,
    )


def run(args: argparse.Namespace) -> dict:
    """Preprocess per ``args``; returns the summary statistics (also printed)."""
    return preprocess(config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tokenize JSONL or Parquet into Megatron .bin/.idx datasets.")
    g = p.add_argument_group("input data")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        help=".jsonl / .jsonl.gz / .parquet / .arrow files, globs, or `datasets` save_to_disk directories",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON keys or Parquet columns to extract (one dataset each)",
    )
    g.add_argument("--split-sentences", action="store_true", help="not supported (Megatron's BERT path)")
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="accepted for compatibility; documents are always tokenized whole, newlines kept",
    )
    g.add_argument("--strict", action="store_true", help="a bad input line is a fatal error")
    g.add_argument(
        "--allow-empty", action="store_true", help="write the dataset even when the input yields no tokens"
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    g.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model, HF directory or tokenizer.json"
    )
    g.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    g.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id to every document"
    )
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: in-process)")
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="parallel parts; as in Megatron-LM, records are dealt out in turn and the parts written one "
        "after another",
    )
    g.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="with --partitions, cut the input into contiguous parts so the output keeps the input order",
    )
    g.add_argument(
        "--log-interval", type=int, default=1000, help="refresh the docs/s, tok/s figures every N docs"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar (summary and warnings only)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.split_sentences:
        parser.error("--split-sentences is not supported: GPT pre-training tokenizes whole documents")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.partitions < 1:
        parser.error("--partitions must be >= 1")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        parser.error("--tokenizer-type NullTokenizer needs --vocab-size")
    try:
        with sigterm_as_interrupt():
            run(args)
    except StrictError as exc:
        print(f"error: {exc} (--strict: stopping; nothing was written)", file=sys.stderr)
        return 1
    except MegatronColaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print("interrupted: temporary outputs removed, nothing was written", file=sys.stderr)
        return 128 + int(exc.args[0]) if isinstance(exc, Terminated) else 130
    return 0
