"""Megatron's learning-rate schedule: linear warmup, then cosine/linear decay to ``min_lr``, then flat."""

from __future__ import annotations

import math

import torch


def lr_at(
    iteration: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, style: str = "cosine"
) -> float:
    """Learning rate used for optimizer step ``iteration`` (0-based)."""
    if warmup_iters > 0 and iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    if style == "constant":
        return lr
    if iteration >= decay_iters:
        return min_lr
    progress = (iteration - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "linear":
        coeff = 1.0 - progress
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
    else:
        raise ValueError(f"unknown lr decay style {style!r}; allowed: cosine, linear, constant")
    return min_lr + coeff * (lr - min_lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    decay_iters: int,
    style: str,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``lr_at``; its state (the step count) is saved with the checkpoint."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_at(it, lr, min_lr, warmup_iters, decay_iters, style) / lr
    )
