"""The DeepSpeed config of a run: generated from the flags, or the user's file completed by them."""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any

from megatron_cola.training.model_files import atomic_write_text


def build_ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """Batch sizes, precision, clipping and ZeRO from the flags (a user config's other keys are kept).

    The optimizer and LR schedule are created by ``pretrain_cola.py`` itself (AdamW, Megatron's schedule)
    and handed to ``deepspeed.initialize``, so the config carries no ``optimizer``/``scheduler`` section.
    """
    cfg: dict[str, Any] = copy.deepcopy(args.user_ds_config) if args.user_ds_config else {}
    cfg["train_batch_size"] = args.global_batch_size
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    cfg["gradient_clipping"] = args.clip_grad
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bool(args.bf16)}
    cfg.pop("fp16", None)
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = args.zero_stage
    if args.zero_stage >= 2:
        zero.setdefault("overlap_comm", False)
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_bucket_size", 50_000_000)
    if args.zero_stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    cfg["zero_optimization"] = zero
    # Our optimizer is torch's (fused) AdamW or DeepSpeed's FusedAdam, created outside the config.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)  # we log ourselves, Megatron style
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def save_ds_config(cfg: dict[str, Any], directory: str) -> str:
    """Write the config as ``{directory}/ds_config.json`` (atomically) and return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "ds_config.json")
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
