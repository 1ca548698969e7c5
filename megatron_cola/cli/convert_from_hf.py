"""Import a Hugging Face folder as a Megatron-CoLA checkpoint that ``pretrain_cola.py --load`` continues from.

python tools/convert_from_hf.py --load HF_DIR --save CKPT_DIR [--tokenizer-model PATH] [--dtype fp32|bf16]
                                [--overwrite]

Understood: ``LlamaForCausalLM`` folders (-> the full-rank model), Megatron-CoLA ``ColaForCausalLM`` exports
(-> CoLA) and the CoLA authors' ``ColaForCausalLM`` (``model_type: cola``; ``cola_a``/``cola_b`` tensors).
Writes ``CKPT_DIR/iter_0000000/model_tp00.pt`` (tensor-parallel size 1) and ``CKPT_DIR/latest``; the
tokenizer (the folder's, or --tokenizer-model) is copied to ``CKPT_DIR/tokenizer``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_cola.convert.hf_format import DTYPES
from megatron_cola.convert.import_hf import import_hf_folder
from megatron_cola.errors import MegatronColaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Hugging Face model folder")
    p.add_argument(
        "--save", required=True, help="checkpoint directory to write (the --load of pretrain_cola.py)"
    )
    p.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model or HF tokenizer folder to record"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --save")
    a = p.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UserWarning)
            path = import_hf_folder(
                a.load, a.save, tokenizer_model=a.tokenizer_model, dtype=a.dtype, overwrite=a.overwrite
            )
        for note in notes:
            print(f"convert_from_hf: note: {note.message}", file=sys.stderr)
    except MegatronColaError as err:
        print(f"convert_from_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
