"""Load a checkpoint or an HF folder as a ``transformers`` model and tokenizer, and sample from it.

A checkpoint directory is exported in memory (``build_hf_model``), so both sources decode through the
same ``generate()`` with a KV cache. Megatron-CoLA exports load with the package's own
``ColaForCausalLM`` (no remote code needed); other folders go through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_cola.checkpoint import load_full_state_dict
from megatron_cola.config import ModelArgs
from megatron_cola.convert.export import build_hf_model, dtype_kwarg
from megatron_cola.convert.hf_format import COLA_MODEL_TYPE, read_config
from megatron_cola.convert.tokenizer import TokenizerSpec, load_hf_tokenizer, special_token_ids


def is_hf_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def load_model_and_tokenizer(
    path: str,
    iteration: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_model: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a checkpoint directory or an HF folder; the tokenizer may be ``None``."""
    if is_hf_folder(path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if read_config(path).get("model_type") == COLA_MODEL_TYPE:
            from megatron_cola.convert.modeling_cola import ColaForCausalLM

            model = ColaForCausalLM.from_pretrained(path, **dtype_kwarg(dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code, **dtype_kwarg(dtype)
            )
        if tokenizer_model:
            tokenizer = load_hf_tokenizer(TokenizerSpec.from_info(None, tokenizer_model))
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                tokenizer = None
        return model.to(device).eval(), tokenizer
    state, meta = load_full_state_dict(path, iteration, drop_vocab_padding=True)
    args = ModelArgs.from_dict(meta["args"])
    spec = TokenizerSpec.from_info(meta.get("tokenizer"), tokenizer_model)
    tokenizer = None
    token_ids: dict[str, int | None] = {}
    if spec is not None and os.path.exists(spec.path):
        tokenizer = load_hf_tokenizer(spec)
        token_ids = special_token_ids(spec)
    model = build_hf_model(state, args, token_ids, dtype)
    return model.to(device).eval(), tokenizer


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 1234


@torch.no_grad()
def generate_ids(
    model: Any, prompt_ids: torch.Tensor, opts: SamplingOptions, eos: int | None
) -> torch.Tensor:
    """Continue ``prompt_ids`` ``(B, T)``; returns the new tokens ``(B, <= max_new_tokens)``."""
    torch.manual_seed(opts.seed)
    kwargs: dict[str, Any] = {"max_new_tokens": opts.max_new_tokens, "eos_token_id": eos, "pad_token_id": eos}
    if opts.greedy or opts.temperature <= 0:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=0)
    prompt_ids = prompt_ids.to(model.device)
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **kwargs)
    return out[:, prompt_ids.shape[1] :]
