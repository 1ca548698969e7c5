"""Weights-only loading: a checkpoint's model files (any TP layout) into a model (any TP layout).

Used by ``--finetune`` and for checkpoints converted from Hugging Face (model files, no DeepSpeed state).
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_cola.checkpoint.io import CheckpointReader
from megatron_cola.checkpoint.model_files import load_full_state_dict
from megatron_cola.config import ModelArgs
from megatron_cola.errors import CheckpointError
from megatron_cola.model.sharding import full_shape, load_full_
from megatron_cola.model.transformer import param_seed

# Architecture details a weights-only load takes from the checkpoint rather than from --model-size.
ADOPTED_FIELDS = ("norm_eps", "rope_theta", "gate_activation", "mlp_gate_act", "cola_activation", "init_std")
_VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")


def load_weights_only(
    model: torch.nn.Module,
    load_dir: str,
    iteration: int | None = None,
    seed: int = 1234,
    init_std: float = 0.02,
) -> dict[str, Any]:
    """Copy a checkpoint's weights into ``model``; returns the checkpoint's metadata.

    Embedding/head rows beyond the checkpoint's vocab keep a fresh seeded initialisation.
    """
    state, meta = load_full_state_dict(load_dir, iteration)
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint in {load_dir} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it saved with a different --model-size / --full-rank?)"
            + _architectures(meta, model)
        )
    with torch.no_grad():
        for name in own:
            full = state[name]
            shape = full_shape(model, name)
            if name in _VOCAB_PARAMS and full.shape[0] != shape[0]:
                # Different vocab padding: rows past the checkpoint's vocab get a fresh seeded init.
                gen = torch.Generator().manual_seed(param_seed(seed, name))
                grown = torch.empty(shape).normal_(0.0, init_std, generator=gen)
                n = min(full.shape[0], shape[0])
                grown[:n] = full[:n]
                full = grown
            if tuple(full.shape) != shape:
                raise CheckpointError(
                    f"tensor {name}: checkpoint shape {tuple(full.shape)} != model shape {shape}"
                    + _architectures(meta, model)
                )
            load_full_(model, name, full)  # this rank's shard of the full tensor
    return meta


def describe_architecture(args: dict[str, Any]) -> str:
    """``hidden size 256, 4 layers, FFN 688, 4 heads, CoLA rank 64`` (or ``full rank``) of model args."""
    get = args.get
    kind = "full rank" if get("full_rank") else f"CoLA rank {get('cola_rank')}"
    return (
        f"hidden size {get('hidden_size')}, {get('num_layers')} layers, FFN {get('ffn_hidden_size')}, "
        f"{get('num_attention_heads')} heads, {kind}"
    )


def _architectures(meta: dict[str, Any], model: torch.nn.Module) -> str:
    """``: the checkpoint records ...; this run asked for ...`` for a load error, from the model file's args
    and the model's own (``CoLALlama.args``)."""
    saved = meta.get("args") or {}
    asked = getattr(model, "args", None)
    if not saved or not isinstance(asked, ModelArgs):
        return ""
    return (
        f": the checkpoint records {describe_architecture(saved)}; this run asked for "
        f"{describe_architecture(asked.to_dict())} (set --model-size, --hidden-size, --num-layers, "
        "--ffn-hidden-size, --num-attention-heads, --cola-rank or --full-rank to match the checkpoint)"
    )


def adopt_architecture(
    model_args: ModelArgs, load_dir: str, iteration: int | None = None
) -> tuple[ModelArgs, dict[str, Any]]:
    """``model_args`` with the checkpoint's values of ``ADOPTED_FIELDS`` (of ``iteration``, default
    ``latest``), and what changed."""
    reader = (
        CheckpointReader(load_dir, iteration) if iteration is not None else CheckpointReader.latest(load_dir)
    )
    paths = reader.glob("model_tp*.pt") if reader is not None else []
    if not paths:
        where = reader.dir if reader is not None else load_dir
        raise CheckpointError(f"{where}: no model_tpNN.pt files to load weights from")
    saved = reader.load_torch(paths[0], mmap=True)["args"]
    changes = {k: saved[k] for k in ADOPTED_FIELDS if k in saved and saved[k] != getattr(model_args, k)}
    return (model_args.replace(**changes) if changes else model_args), changes
