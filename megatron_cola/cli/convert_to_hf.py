"""Export a Megatron-CoLA checkpoint as a Hugging Face ``transformers`` folder.

python tools/convert_to_hf.py --load CKPT_DIR --save HF_DIR [--iteration N] [--dtype bf16|fp32]
                              [--max-shard-size 2GB] [--tokenizer-model PATH | --no-tokenizer] [--overwrite]
                              [--from-master | --from-module]

Full-rank models become a native ``LlamaForCausalLM``; CoLA models a ``ColaForCausalLM`` whose code is
written into the folder (``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)``).
Any ZeRO stage and tensor-parallel degree: the shards are merged, the vocab padding dropped. The weights
are the fp32 master weights (``optim_tpNN.pt``) when the checkpoint holds them (``--from-master``), else
the model files' (``--from-module``: the module's weights, bf16-rounded in a bf16 run); the tool says which.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_cola.convert.export import export_checkpoint, weights_source
from megatron_cola.convert.hf_format import DTYPES
from megatron_cola.errors import MegatronColaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (the --save of pretrain_cola.py)")
    p.add_argument("--save", required=True, help="output folder for the Hugging Face model")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype of the export")
    p.add_argument(
        "--max-shard-size", default="2GB", help="split the safetensors past this size (2GB, 500MB)"
    )
    p.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model or HF tokenizer folder to use"
    )
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing Hugging Face export at --save (nothing else)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--from-master",
        dest="source",
        action="store_const",
        const="master",
        help="export the fp32 master weights of the optimizer state (optim_tpNN.pt); the default when "
        "the checkpoint holds them",
    )
    src.add_argument(
        "--from-module",
        dest="source",
        action="store_const",
        const="module",
        help="export the module's weights (model_tpNN.pt; bf16-rounded in a bf16 run)",
    )
    p.set_defaults(source="auto")
    a = p.parse_args(argv)
    try:
        used = weights_source(a.load, a.iteration, a.source)
        print(
            "weights: "
            + (
                "the fp32 master weights (optim_tpNN.pt)"
                if used == "master"
                else "the module's weights (model_tpNN.pt)"
            )
        )
        out = export_checkpoint(
            a.load,
            a.save,
            a.iteration,
            dtype=a.dtype,
            max_shard_size=a.max_shard_size,
            tokenizer_model=a.tokenizer_model,
            with_tokenizer=not a.no_tokenizer,
            overwrite=a.overwrite,
            source=used,
        )
    except MegatronColaError as err:
        print(f"convert_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0
