"""Model-weight files of a checkpoint, independent of ZeRO stage: ``{save}/{tag}/model_tp{NN}.pt``.

Besides DeepSpeed's own files (optimizer and engine state, used to resume), every checkpoint directory
holds one model file per tensor-parallel rank, written by data-parallel rank 0 of that TP group with the
parameters gathered (ZeRO-3 included). Each is a ``torch.save`` dict:

``format``        ``"megatron-cola-model"``, ``version`` 1
``args``          ``ModelArgs.to_dict()`` (``vocab_size`` is the padded size the model was built with)
``vocab_size``    the tokenizer's (unpadded) vocab size, or ``None`` when unknown
``tp_rank``, ``tp_size``
``split_dims``    ``{param name: dim}`` for each tensor-parallel-sharded parameter: the full tensor is the
                  ``torch.cat`` of the shards of ranks 0..tp_size-1 along ``dim``; absent = replicated
``tp_scheme``     the ``ShardingPlan.scheme`` the shards come from (``"none"``, ``"dense"``,
                  ``"split-rank"``, ``"bottleneck"``); files written before it existed are ``"split-rank"``
                  (or ``"none"`` at TP=1). The merge needs only ``split_dims``, whatever the scheme
``state_dict``    this rank's parameters (the model's own names: ``layers.0.self_attn.q_proj.weight_a``, ...)
``iteration``, ``tokenizer`` (``{"type": ..., "model": ...}`` or ``None``)

``load_full_state_dict`` reads all ranks' files back into one unsharded state dict.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from megatron_cola.checkpoint.io import CheckpointReader, CheckpointWriter, atomic_torch_save, failure_message
from megatron_cola.checkpoint.layout import model_file_name
from megatron_cola.errors import CheckpointError

FORMAT = "megatron-cola-model"
VERSION = 1


def model_file_payload(
    state_dict: dict[str, torch.Tensor],
    args: dict[str, Any],
    split_dims: dict[str, int],
    tp_rank: int = 0,
    tp_size: int = 1,
    vocab_size: int | None = None,
    iteration: int = 0,
    tokenizer: dict[str, Any] | None = None,
    tp_scheme: str = "none",
) -> dict[str, Any]:
    """What one TP rank's model file holds (its tensors on the CPU)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "args": dict(args),
        "vocab_size": vocab_size,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "split_dims": dict(split_dims),
        "tp_scheme": tp_scheme,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "iteration": iteration,
        "tokenizer": tokenizer,
    }


def save_model_file(path: str, state_dict: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> None:
    """Write one TP rank's model file atomically (arguments as ``model_file_payload``)."""
    atomic_torch_save(model_file_payload(state_dict, *args, **kwargs), path)


def save_weights_checkpoint(
    root: str,
    state_dict: dict[str, torch.Tensor],
    args: dict[str, Any],
    *,
    iteration: int = 0,
    vocab_size: int | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> str:
    """A complete weights-only checkpoint under ``root`` (tensor-parallel size 1, unsharded), written
    through ``CheckpointWriter`` like a training save: the model file, the manifest (``kind="weights"``:
    loaded as weights, never resumed from), then ``latest`` and ``latest_checkpointed_iteration.txt``.
    Returns the model file's path; a write that fails raises ``CheckpointError``."""
    writer = CheckpointWriter(root, iteration)
    payload = model_file_payload(
        state_dict, args, {}, vocab_size=vocab_size, iteration=iteration, tokenizer=tokenizer
    )
    path = writer.save_torch(model_file_name(0), payload)
    if writer.failures:
        shutil.rmtree(writer.dir, ignore_errors=True)
        raise CheckpointError(failure_message(root, writer.dir, writer.failures))
    writer.finalize(kind="weights")
    writer.commit()
    return path


def load_model_files(reader: CheckpointReader) -> list[dict[str, Any]]:
    """All TP ranks' model files of one checkpoint, checked for completeness."""
    ckpt_dir = reader.dir
    paths = reader.glob("model_tp*.pt")
    if not paths:
        raise CheckpointError(f"{ckpt_dir} holds no model_tpNN.pt files (not a Megatron-CoLA checkpoint?)")
    reader.check_files([os.path.basename(p) for p in paths])
    files = []
    for p in paths:
        obj = reader.load_torch(p)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CheckpointError(f"{p} is not a Megatron-CoLA model file")
        if obj.get("version") != VERSION:
            raise CheckpointError(f"{p} has format version {obj.get('version')}, this code reads {VERSION}")
        files.append(obj)
    tp_size = files[0]["tp_size"]
    ranks = sorted(f["tp_rank"] for f in files)
    if ranks != list(range(tp_size)):
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint was written with tensor-parallel size {tp_size} but holds the model "
            f"files of ranks {ranks}; a shard is missing"
        )
    return sorted(files, key=lambda f: f["tp_rank"])


def merge_tp_shards(files: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One unsharded state dict from the per-rank files (in TP-rank order)."""
    split_dims = files[0]["split_dims"]
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in files[0]["state_dict"].items():
        if name in split_dims and len(files) > 1:
            merged[name] = torch.cat([f["state_dict"][name] for f in files], dim=split_dims[name])
        else:
            merged[name] = tensor
    return merged


def load_full_state_dict(
    load_dir: str, iteration: int | None = None, drop_vocab_padding: bool = False, source: str = "module"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded state dict and metadata (``args``, ``vocab_size``, ``iteration``, ``tokenizer``,
    ``tp_size``) of a checkpoint. With ``drop_vocab_padding`` the embedding and LM head are cut to the
    tokenizer's vocab size and ``args["vocab_size"]`` set to it. ``source="master"``: the weights are
    the fp32 master weights of the layout-free optimizer state (``optim_tpNN.pt``) instead of the module's
    (bf16 in a bf16 run)."""
    reader = CheckpointReader(load_dir, iteration)
    files = load_model_files(reader)
    if source == "master":
        from megatron_cola.checkpoint.optim_state import full_masters, load_optim_files

        state = dict(full_masters(load_optim_files(reader)))
    elif source == "module":
        state = merge_tp_shards(files)
    else:
        raise ValueError(f"source must be 'module' or 'master', got {source!r}")
    meta = {k: files[0][k] for k in ("args", "vocab_size", "iteration", "tokenizer", "tp_size")}
    meta["args"] = dict(meta["args"])
    if drop_vocab_padding and meta["vocab_size"] and meta["vocab_size"] < meta["args"]["vocab_size"]:
        n = meta["vocab_size"]
        for name in ("embed_tokens.weight", "lm_head.weight"):
            state[name] = state[name][:n].contiguous()
        meta["args"]["vocab_size"] = n
    return state, meta
