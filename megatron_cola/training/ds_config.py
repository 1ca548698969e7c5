"""The DeepSpeed config of a run: generated from the flags, or the user's file completed by them."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.training.train_config import TrainConfig


def _device_type(cfg: TrainConfig) -> str:
    """``--device`` resolved as ``pretrain.py`` resolves it (``auto``: CUDA when torch sees a GPU)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def build_ds_config(cfg: TrainConfig, device_type: str | None = None) -> dict[str, Any]:
    """Batch sizes, precision, clipping and ZeRO from the flags (a user config's other keys are kept).

    ``device_type`` (``"cuda"``/``"cpu"``; default: ``--device`` resolved) picks device-specific
    defaults: ZeRO-2/3 overlap the gradient reduction with the backward pass on CUDA only.

    The optimizer and LR schedule are created by ``pretrain_cola.py`` itself (AdamW, Megatron's schedule)
    and handed to ``deepspeed.initialize``, so the config carries no ``optimizer``/``scheduler`` section.
    """
    out: dict[str, Any] = copy.deepcopy(dict(cfg.user_ds_config)) if cfg.user_ds_config else {}
    out["train_batch_size"] = cfg.global_batch_size
    out["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    out["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    out["gradient_clipping"] = cfg.clip_grad
    # Set explicitly: DeepSpeed's bf16 optimizers skip a step whose grad norm is non-finite only when
    # this is true (its default today); the non-finite guard (training/guards.py) relies on it.
    out["bf16"] = {
        **out.get("bf16", {}),
        "enabled": bool(cfg.bf16),
        "check_grad_overflow": bool(cfg.check_for_nan_in_loss_and_grad),
    }
    out.pop("fp16", None)
    zero = dict(out.get("zero_optimization", {}))
    zero["stage"] = cfg.zero_stage
    if cfg.zero_stage >= 2:
        # On CUDA the reduce-scatter of each gradient bucket runs on a side stream during backward.
        # DeepSpeed's CPU accelerator has no streams (its Stream() is None): nothing would overlap,
        # and the extra gradient buckets overlap_comm keeps would only cost host memory.
        zero.setdefault("overlap_comm", (device_type or _device_type(cfg)) == "cuda")
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_bucket_size", 50_000_000)
    if cfg.zero_stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    out["zero_optimization"] = zero
    # Our optimizer is torch's (fused) AdamW or DeepSpeed's FusedAdam, created outside the config.
    out.setdefault("zero_allow_untested_optimizer", True)
    out.setdefault("steps_per_print", 10**9)  # we log ourselves, Megatron style
    out.setdefault("wall_clock_breakdown", False)
    return out


def save_ds_config(ds_config: dict[str, Any], directory: str) -> str:
    """Write the config as ``{directory}/ds_config.json`` (atomically) and return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "ds_config.json")
    atomic_write_text(path, json.dumps(ds_config, indent=2, sort_keys=True) + "\n")
    return path
