#!/usr/bin/env python3
"""Train a SentencePiece tokenizer (BPE by default, LLaMA-style settings) from JSONL text.

    python tools/train_tokenizer.py --input data/sample/train.jsonl --vocab-size 32000 \\
        --model-prefix data/tokenizer/sample_32k

Every non-empty line of every document's ``--json-key`` field is one training sentence (SentencePiece
skips sentences longer than ``--max-sentence-length`` bytes, so whole documents are not fed). Defaults
follow LLaMA's tokenizer: identity normalisation, whitespace kept, digits split, byte fallback, ids
``<unk>=0 <s>=1 </s>=2`` (``</s>`` is the end-of-document id). ``P.model`` and ``P.vocab`` are written under
temporary names and renamed when complete.
"""

import sys

from megatron_cola.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
