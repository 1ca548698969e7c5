"""Megatron's learning-rate schedule: linear warmup, then cosine/linear decay to ``min_lr``, then flat.

``Schedule`` holds the five numbers that define it (named like the flags: ``--lr``, ``--min-lr``,
``--lr-warmup-iters``, ``--lr-decay-iters``, ``--lr-decay-style``); ``LRSchedule`` is the scheduler the
engine steps. A resumed run keeps the checkpoint's ``Schedule`` unless ``--override-opt-param-scheduler``
(``training/checkpointing.py``) and sets it with ``LRSchedule.set_schedule`` once the engine has loaded
its state, so the next step's learning rate is the schedule's whatever was (or was not) loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

DECAY_STYLES = ("cosine", "linear", "constant")
#: The fields of a ``Schedule`` and their flags.
SCHEDULE_FLAGS = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_iters": "--lr-warmup-iters",
    "lr_decay_iters": "--lr-decay-iters",
    "lr_decay_style": "--lr-decay-style",
}


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
        raise ValueError(f"unknown lr decay style {style!r}; allowed: {', '.join(DECAY_STYLES)}")
    return min_lr + coeff * (lr - min_lr)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run, field names as the flags' ``dest``."""

    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_iters: int
    lr_decay_style: str

    @classmethod
    def from_values(cls, values: Mapping[str, Any], fallback: Mapping[str, Any] | None = None) -> Schedule:
        """From a mapping holding the five keys (a ``TrainConfig.to_dict()``, a checkpoint's recorded
        flags); a key missing from ``values`` is taken from ``fallback``."""
        fallback = fallback or {}
        picked = {k: values[k] if k in values else fallback[k] for k in SCHEDULE_FLAGS}
        return cls(
            lr=float(picked["lr"]),
            min_lr=float(picked["min_lr"]),
            lr_warmup_iters=int(picked["lr_warmup_iters"]),
            lr_decay_iters=int(picked["lr_decay_iters"]),
            lr_decay_style=str(picked["lr_decay_style"]),
        )

    def values(self) -> dict[str, Any]:
        """The five values by flag ``dest`` (what a checkpoint records)."""
        return dataclasses.asdict(self)

    def lr_at(self, iteration: int) -> float:
        """Learning rate of optimizer step ``iteration`` (0-based: the step that makes iteration + 1)."""
        return lr_at(
            iteration, self.lr, self.min_lr, self.lr_warmup_iters, self.lr_decay_iters, self.lr_decay_style
        )

    def describe(self) -> str:
        """The flags that give this schedule, e.g. ``--lr 0.003 --min-lr 0.0003 ...``."""
        return " ".join(f"{flag} {show_value(getattr(self, key))}" for key, flag in SCHEDULE_FLAGS.items())


def show_value(value: Any) -> str:
    """A flag value as the log shows it (floats to 6 significant digits)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class LRSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Steps the optimizer's learning rate along a ``Schedule``. Its state (the step count) is saved with
    the checkpoint by DeepSpeed; the ``Schedule`` itself is not (the checkpoint's recorded flags hold it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        self.schedule = schedule
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
            group["initial_lr"] = schedule.lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [self.schedule.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("schedule", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The step count of a checkpoint (also one written by the ``LambdaLR`` this class replaced)."""
        state = {k: v for k, v in state_dict.items() if k not in ("schedule", "lr_lambdas")}
        super().load_state_dict(state)

    def set_schedule(self, schedule: Schedule) -> None:
        """Follow ``schedule`` from the current step on, and set the optimizer's learning rate for the next
        step now: a resume calls this after the engine loaded its state (with ``--no-load-optim`` the
        optimizer still holds the learning rate of step 0)."""
        self.schedule = schedule
        self.base_lrs = [schedule.lr] * len(self.optimizer.param_groups)
        lr = schedule.lr_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = schedule.lr
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> LRSchedule:
    """The run's scheduler; its state (the step count) is saved with the checkpoint."""
    return LRSchedule(optimizer, schedule)
