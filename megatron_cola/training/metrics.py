"""``TrainingMetrics``: the one owner of a run's training metrics, from the step to the log line.

It holds the queue of not-yet-logged steps (each step's loss and grad norm stay on the device, so a step
never waits for the host), the window of steps since the last log line (their losses, skipped steps and
training time, ``StepTimer``), the run's clock for elapsed time and ETA, and the writers (``metrics.jsonl``,
TensorBoard, Weights & Biases through ``MetricsWriter``). The trainer calls:

- ``record_step(...)`` once per optimizer step (queues tensors, reads nothing on the host);
- ``flush()`` at a log interval and before an evaluation, a save or the end of the run: the queued losses
  are averaged over the data-parallel ranks with one all-reduce, turned into floats in one go and written
  as the per-step ``train`` records (the same records, with the same values, as when each step was
  reduced and written on its own);
- ``log(...)`` at a log interval: the Megatron-shaped iteration line and its ``throughput`` record;
- ``log_evaluation(...)`` after a validation or test pass; ``paused()`` around anything that is not
  training time; ``close()`` at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_cola.config import ModelArgs
from megatron_cola.model.flops import training_flops_per_token
from megatron_cola.parallel import ParallelState
from megatron_cola.training.logging_utils import (
    MetricsWriter,
    StepTimer,
    device_name,
    format_train_line,
    peak_memory_gb,
    peak_tflops,
    print_rank_0,
)
from megatron_cola.training.train_config import TrainConfig
from megatron_cola.training.watchdog import straggler_line


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


class TrainingMetrics:
    """The step queue, the log window, the timer, the skip counts and the writers of one run (the
    writers write on rank 0 only; every rank must call ``flush`` and ``log`` at the same iterations,
    since they hold the loss all-reduce and, with ``--log-straggler``, an all-gather)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_args: ModelArgs,
        parallel: ParallelState,
        device: torch.device,
        writer: MetricsWriter,
        optimizer_name: str,
    ) -> None:
        self.cfg = cfg
        self.parallel = parallel
        self.device = device
        self.writer = writer
        self.optimizer_name = optimizer_name
        self.flops_per_token = training_flops_per_token(model_args, cfg.seq_length)
        self.peak = peak_tflops(device, cfg.peak_tflops)
        if self.peak is not None:
            source = "--peak-tflops" if cfg.peak_tflops is not None else device_name(device)
            print_rank_0(f"> MFU against a peak of {self.peak:.0f} TFLOP/s per device ({source})")
        elif device.type == "cuda":
            print_rank_0(f"> no MFU: no known bf16 peak for {device_name(device)!r}; pass --peak-tflops")
        self.timer = StepTimer(device)
        self._pending: list[_Step] = []
        self._window_losses: list[float] = []  # data-parallel mean losses of the flushed window steps
        self.last_grad_norm: float | None = None
        self.window_skips = 0  # skipped steps since the last log line
        self.total_skips = 0  # skipped steps of this launch
        self._start_time: float | None = None  # when this launch's training loop began
        self._start_iteration = 0

    @classmethod
    def for_run(
        cls,
        cfg: TrainConfig,
        model_args: ModelArgs,
        parallel: ParallelState,
        device: torch.device,
        optimizer_name: str,
    ) -> TrainingMetrics:
        """The metrics of a training run: rank 0 writes ``--tensorboard-dir`` and W&B."""
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        writer = MetricsWriter.for_run(cfg, enabled=rank0)
        return cls(cfg, model_args, parallel, device, writer, optimizer_name)

    # ------------------------------------------------------------------------------------- per step
    def start(self, iteration: int) -> None:
        """The training loop begins after ``iteration``: the step timer and the run's clock start."""
        self._start_time = time.perf_counter()
        self._start_iteration = iteration
        self.timer = StepTimer(self.device)

    def record_step(
        self,
        iteration: int,
        consumed_tokens: int,
        loss: torch.Tensor,
        lr: float,
        grad_norm: Any,
        skipped: bool = False,
    ) -> None:
        """Queue one optimizer step (its loss and grad norm stay tensors on the device)."""
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach()
        self._pending.append(_Step(iteration, consumed_tokens, loss.detach().float(), lr, grad_norm, skipped))
        self.timer.step()
        if skipped:
            self.window_skips += 1
            self.total_skips += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (an evaluation, a save) out of the training time per step."""
        with self.timer.paused():
            yield

    # ------------------------------------------------------------------------------------- logging
    def flush(self) -> list[dict[str, Any]]:
        """Reduce, convert and write the queued steps (one all-reduce, one device-to-host copy); returns
        their ``train`` records (``iteration``, ``consumed_tokens``, ``lm_loss`` as the data-parallel
        mean, ``lr``, ``grad_norm``, ``skipped``)."""
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
        self._window_losses += values
        return records

    def log(self, iteration: int, consumed_samples: int, lr: float) -> dict[str, Any]:
        """Print the iteration line for the steps since the last one (losses averaged over them) and
        write its ``throughput`` record; returns the record. Flushes first."""
        self.flush()
        cfg = self.cfg
        steps, seconds = self.timer.take()
        step_time = seconds / max(steps, 1)
        tokens_per_s = cfg.global_batch_size * cfg.seq_length / step_time if step_time > 0 else 0.0
        tflops = self.flops_per_token * tokens_per_s / cfg.world_size / 1e12
        elapsed, eta = self._elapsed_and_eta(iteration)
        window = self._window_losses
        record = {
            "iteration": iteration,
            "train_iters": cfg.train_iters,
            "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_samples * cfg.seq_length,
            "step_time_ms": 1000 * step_time,
            "lr": lr,
            "global_batch_size": cfg.global_batch_size,
            "lm_loss": sum(window) / len(window) if window else math.nan,
            "grad_norm": self.last_grad_norm,
            "tokens_per_second": tokens_per_s,
            "tflops_per_device": tflops,
            "flops_per_token": self.flops_per_token,
            "mfu": tflops / self.peak if self.peak else None,
            "peak_tflops": self.peak,
            "optimizer": self.optimizer_name,
            "peak_memory_gb": peak_memory_gb(self.device),
            "skipped_iterations": self.window_skips,
            "elapsed_seconds": elapsed,
            "eta_seconds": eta,
        }
        print_rank_0(format_train_line(record))
        if cfg.log_straggler:
            line = straggler_line(step_time, self.device)
            if line is not None:
                print_rank_0(line)
        del record["train_iters"]
        self.writer.write("throughput", record)
        self._window_losses = []
        self.window_skips = 0
        return record

    def _elapsed_and_eta(self, iteration: int) -> tuple[float, float]:
        """Wall-clock seconds since this launch's loop began (evaluations and saves included), and the
        remaining iterations at the mean wall-clock time per iteration so far."""
        if self._start_time is None:
            self.start(iteration)
        elapsed = time.perf_counter() - self._start_time
        done = iteration - self._start_iteration
        remaining = max(self.cfg.train_iters - iteration, 0)
        return elapsed, (elapsed / done * remaining if done > 0 else 0.0)

    def log_evaluation(self, name: str, iteration: int, consumed_tokens: int, loss: float) -> None:
        """Megatron's boxed ``validation``/``test`` loss line and its record."""
        ppl = math.exp(min(loss, 20.0))
        line = f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
        bar = "-" * len(line)
        print_rank_0(f"{bar}\n{line}\n{bar}")
        record = {"iteration": iteration, "consumed_tokens": consumed_tokens, "lm_loss": loss, "ppl": ppl}
        self.writer.write(name, record)

    def close(self) -> None:
        self.writer.close()
