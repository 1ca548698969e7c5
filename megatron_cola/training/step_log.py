"""Per-step training metrics kept on the device until a log interval, so steps do not wait for the host.

Each step's loss (this rank's mean over its micro-batches) and grad norm are queued as tensors. ``flush``
(called at log intervals and before evaluation, saving and the end of the run) averages all queued
losses over the data-parallel ranks with one all-reduce, turns everything into Python floats in one go
and writes the per-step ``train`` records of ``metrics.jsonl``: the same records, with the same values,
as when each step was reduced and written on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_cola.parallel import ParallelState
from megatron_cola.training.logging_utils import MetricsWriter


@dataclass
class _Step:
    iteration: int
    consumed_tokens: int
    loss: torch.Tensor  # this rank's mean loss of the step, 0-d, on the device
    lr: float
    grad_norm: Any  # a 0-d tensor, a float or None, as DeepSpeed reports it
    skipped: bool = False  # the optimizer step was skipped (non-finite loss or grad norm)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class StepLog:
    """Queue of not-yet-logged steps; ``flush`` returns ``[(iteration, data-parallel mean loss)]``."""

    def __init__(self, parallel: ParallelState, writer: MetricsWriter) -> None:
        self.parallel = parallel
        self.writer = writer
        self._pending: list[_Step] = []
        self.last_grad_norm: float | None = None

    def add(
        self,
        iteration: int,
        consumed_tokens: int,
        loss: torch.Tensor,
        lr: float,
        grad_norm: Any,
        skipped: bool = False,
    ) -> None:
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach()
        step = _Step(iteration, consumed_tokens, loss.detach().float(), lr, grad_norm, skipped)
        self._pending.append(step)

    def flush(self) -> list[tuple[int, float]]:
        """Reduce, convert and write the queued steps (one all-reduce, one device-to-host copy)."""
        if not self._pending:
            return []
        losses = torch.stack([s.loss for s in self._pending])
        if self.parallel.dp_size > 1:
            dist.all_reduce(losses, group=self.parallel.dp_group)
            losses /= self.parallel.dp_size
        values = losses.tolist()
        records = []
        for step, loss in zip(self._pending, values):
            grad_norm = _as_float(step.grad_norm)
            records.append(
                {
                    "iteration": step.iteration,
                    "consumed_tokens": step.consumed_tokens,
                    "lm_loss": loss,
                    "lr": step.lr,
                    "grad_norm": grad_norm,
                    "skipped": step.skipped,
                }
            )
            self.last_grad_norm = grad_norm
        self.writer.write_many("train", records)
        self._pending = []
        return [(r["iteration"], r["lm_loss"]) for r in records]
