"""Sample text from a Megatron-CoLA checkpoint directory or a Hugging Face folder.

python tools/generate.py --load PATH --prompt "Once upon a time" [--max-new-tokens 64] [--temperature 0.8]
                         [--top-p 0.95] [--seed 1234] [--greedy] [--iteration N] [--num-samples 1]

PATH is a checkpoint directory (the --save of pretrain_cola.py; exported in memory) or a folder written by
tools/convert_to_hf.py (or any LLaMA folder). Decoding is ``transformers``' ``generate()`` with a KV cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from megatron_cola.convert.hf_format import DTYPES
from megatron_cola.convert.inference import SamplingOptions, generate_ids, load_model_and_tokenizer
from megatron_cola.errors import MegatronColaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory or Hugging Face folder")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature and top-p)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the same prompt")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer to use instead of the recorded one")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom code of other HF folders")
    a = p.parse_args(argv)
    if not os.path.exists(a.load):
        p.error(f"--load {a.load} does not exist (a checkpoint directory or a Hugging Face folder)")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_model_and_tokenizer(
            a.load, a.iteration, DTYPES[a.dtype], a.device, a.tokenizer_model, a.trust_remote_code
        )
    except MegatronColaError as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 1
    if tokenizer is None:
        print("generate: error: no tokenizer found; pass --tokenizer-model PATH", file=sys.stderr)
        return 1
    ids = tokenizer.encode(a.prompt, add_special_tokens=False)
    if not ids:  # an empty prompt starts from the end-of-document token, as a new document would
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    prompt = torch.tensor([ids] * a.num_samples)
    opts = SamplingOptions(a.max_new_tokens, a.temperature, a.top_p, a.greedy, a.seed)
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    new = generate_ids(model, prompt, opts, eos)
    elapsed = time.perf_counter() - start
    for i, row in enumerate(new.tolist()):
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        # Decode prompt and continuation together: SentencePiece strips a leading space from decoded text.
        text = tokenizer.decode(ids + row, skip_special_tokens=True)
        print(f"--- sample {i}" if a.num_samples > 1 else "---")
        print(text)
    print(f"--- {new.numel()} tokens in {elapsed:.2f}s on {a.device}", file=sys.stderr)
    return 0
