"""Import a Hugging Face folder as a Megatron-CoLA checkpoint that ``pretrain_cola.py --load`` continues from.

Understood folders (see ``hf_format`` for the weight layouts): a ``LlamaForCausalLM`` (-> our full-rank
model), a Megatron-CoLA ``ColaForCausalLM`` export (-> CoLA) and the CoLA authors' ``ColaForCausalLM``
and CoLA-M ``ColaMForCausalLM`` (``model_type: cola``; ``cola_a`` ``[in, rank]`` / ``cola_b``
``[rank, out]``, config ``rank``, ``hidden_act``, ``only_lr_act``; CoLA-M is told apart by its tensor
names). Every tensor is checked against the shapes the config implies; the first problems are reported
by name with expected and actual shapes.

The result is a weights-only checkpoint written by ``checkpoint.save_weights_checkpoint``:
``{save}/iter_0000000/model_tp00.pt`` (tensor-parallel size 1, no split dims, fp32 by default), its
manifest, ``{save}/latest`` and ``latest_checkpointed_iteration.txt``; the tokenizer files are copied
to ``{save}/tokenizer`` and recorded in the model file. The model file's ``args["vocab_size"]`` is the
HF embedding size; its ``vocab_size`` is the tokenizer's when that is known and not larger.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any

import torch

from megatron_cola.checkpoint import LATEST_FILE, save_weights_checkpoint
from megatron_cola.config import ModelArgs
from megatron_cola.convert.hf_format import (
    DTYPES,
    detect_layout,
    from_layout,
    load_hf_tensors,
    model_args_from_config,
    read_config,
)
from megatron_cola.convert.official_cola import colam_to_cola, is_colam
from megatron_cola.convert.tokenizer import TokenizerSpec, tokenizer_vocab_size
from megatron_cola.errors import CheckpointError, ConversionError

TOKENIZER_DIR = "tokenizer"


def load_hf_folder(hf_dir: str) -> tuple[dict[str, torch.Tensor], ModelArgs, str]:
    """Our state dict (in the folder's dtype), ``ModelArgs`` and the detected layout of an HF folder
    (one of ``hf_format.LAYOUTS``)."""
    config = read_config(hf_dir)
    layout = detect_layout(config, hf_dir)
    args = model_args_from_config(config, layout, hf_dir)
    tensors = load_hf_tensors(hf_dir)
    if (
        layout in ("llama", "official_cola")
        and config.get("tie_word_embeddings")
        and "lm_head.weight" not in tensors
    ):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # untie: our head is its own copy
    if layout == "official_cola" and is_colam(tensors):
        tensors = colam_to_cola(tensors, args.num_layers, hf_dir)
        layout = "official_colam"
    if layout.startswith("official_"):
        _drop_zero_biases(tensors, hf_dir)
    if layout == "official_colam":  # renamed above: its tensors are now read as official_cola's
        state = from_layout(tensors, args, "official_cola", f"{hf_dir} (CoLA-M, named as ColaForCausalLM)")
    else:
        state = from_layout(tensors, args, layout, hf_dir)
    return state, args, layout


def _drop_zero_biases(tensors: dict[str, torch.Tensor], where: str) -> None:
    """The authors' ``ColaLayer`` may carry a ``bias``; ours have none, so only all-zero ones are accepted."""
    for name in [n for n in tensors if n.endswith(".bias")]:
        if torch.count_nonzero(tensors[name]):
            raise ConversionError(
                f"{where}: tensor {name} is a nonzero bias; Megatron-CoLA's CoLA maps have no bias"
            )
        del tensors[name]


def find_tokenizer(hf_dir: str) -> TokenizerSpec | None:
    """The tokenizer of an HF folder: its ``tokenizer.model`` (SentencePiece) when present, else the folder
    itself when it holds HF tokenizer files."""
    if os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
        return TokenizerSpec("sentencepiece", os.path.join(hf_dir, "tokenizer.model"))
    if any(os.path.exists(os.path.join(hf_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return TokenizerSpec("hf", hf_dir)
    return None


def _copy_tokenizer(spec: TokenizerSpec, save_dir: str) -> dict[str, Any]:
    """Copy the tokenizer into ``{save_dir}/tokenizer`` and return the record for the model file."""
    out = os.path.join(save_dir, TOKENIZER_DIR)
    os.makedirs(out, exist_ok=True)
    if spec.kind == "sentencepiece":
        dst = os.path.join(out, "tokenizer.model")
        shutil.copyfile(spec.path, dst)
        return {"type": "SentencePieceTokenizer", "model": os.path.abspath(dst)}
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(spec.path).save_pretrained(out)
    return {"type": "HuggingFaceTokenizer", "model": os.path.abspath(out)}


def import_hf_folder(
    hf_dir: str,
    save_dir: str,
    *,
    tokenizer_model: str | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
) -> str:
    """Convert HF folder ``hf_dir`` into checkpoint directory ``save_dir``; returns the model file path."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is unknown; allowed: {list(DTYPES)}")
    if os.path.exists(os.path.join(save_dir, LATEST_FILE)) and not overwrite:
        raise CheckpointError(f"{save_dir} already holds a checkpoint; pass --overwrite to replace it")
    state, args, _ = load_hf_folder(hf_dir)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    spec = TokenizerSpec.from_info(None, tokenizer_model) if tokenizer_model else find_tokenizer(hf_dir)

    os.makedirs(save_dir, exist_ok=True)
    tokenizer_info = None
    vocab_size = None
    if spec is None:
        warnings.warn(
            f"{hf_dir} has no tokenizer (no tokenizer.model, tokenizer.json or tokenizer_config.json): the "
            "checkpoint records none; pass --tokenizer-model PATH here, or give pretrain_cola.py its "
            "--tokenizer-type/--tokenizer-model",
            stacklevel=2,
        )
    else:
        spec.check_exists()
        tokenizer_info = _copy_tokenizer(spec, save_dir)
        n = tokenizer_vocab_size(spec)
        vocab_size = n if n <= args.vocab_size else None
    return save_weights_checkpoint(
        save_dir, state, args.to_dict(), iteration=0, vocab_size=vocab_size, tokenizer=tokenizer_info
    )
