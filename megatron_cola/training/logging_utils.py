"""Training logs: Megatron-shaped console lines, ``metrics.jsonl``, TensorBoard scalars and (optionally)
Weights & Biases, the last two fed the same scalar points through one writer (``MetricsWriter``)."""

from __future__ import annotations

import abc
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from megatron_cola.training.train_config import TrainConfig

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s, for MFU, keyed by the exact product name that
# ``torch.cuda.get_device_name`` reports (NVIDIA data sheets). Exact names, not fragments: an H100 PCIe
# (756) or NVL (835) is not an SXM H100 (989), an L40S (362) is not an L40 (181). A card missing here
# gets no MFU unless ``--peak-tflops`` gives its peak.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA A800 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L40": 181.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
}


def peak_tflops_for_name(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (``torch.cuda.get_device_name``), or ``None``."""
    return PEAK_BF16_TFLOPS.get(name.strip())


def device_name(device: torch.device) -> str:
    """The GPU's product name, or ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak MFU is measured against: ``override`` (``--peak-tflops``) when given, else the device's
    dense bf16 peak from ``PEAK_BF16_TFLOPS``, else ``None`` (CPU, a card not in the table): no MFU."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_tflops_for_name(device_name(device))


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size, in GiB
    (2**30 bytes; the name is kept for the ``peak_memory_gb`` key of ``metrics.jsonl``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / 2**30


class StepTimer:
    """Training time and training steps since the last log line, evaluation and saving left out.

    ``step()`` counts a step; ``with timer.paused():`` wraps anything that is not training (an
    evaluation, a checkpoint); ``take()`` returns ``(steps, seconds)`` since the previous ``take`` and
    starts the next window. Steps and their time are counted by the same object and reset together, so a
    pause in the middle of a window (an ``--eval-interval`` that is not a multiple of ``--log-interval``)
    leaves out only the paused time, never the steps run before it. On CUDA the device is synchronised
    at each boundary, so queued kernels count where they were launched.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._steps = 0
        self._seconds = 0.0
        self._start: float | None = time.perf_counter()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> None:
        self._steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self._start is None:  # nested: already paused
            yield
            return
        self._seconds += self._now() - self._start
        self._start = None
        try:
            yield
        finally:
            self._start = self._now()

    def take(self) -> tuple[int, float]:
        """``(steps, training seconds)`` of the window now closing; the next one starts now."""
        now = self._now()
        seconds = self._seconds + (now - self._start if self._start is not None else 0.0)
        steps = self._steps
        self._steps, self._seconds, self._start = 0, 0.0, now
        return steps, seconds


def print_rank_0(msg: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(msg, flush=True)


def format_train_line(m: dict[str, Any]) -> str:
    """One log line in Megatron's shape."""
    parts = [
        f" iteration {m['iteration']:8d}/{m['train_iters']:8d}",
        f"consumed samples: {m['consumed_samples']:12d}",
        f"consumed tokens: {m['consumed_tokens']:14d}",
        f"elapsed time per iteration (ms): {m['step_time_ms']:.1f}",
        f"learning rate: {m['lr']:.6E}",
        f"global batch size: {m['global_batch_size']:5d}",
        f"lm loss: {m['lm_loss']:.6E}",
        f"grad norm: {m['grad_norm']:.4f}" if m.get("grad_norm") is not None else "grad norm: n/a",
        f"tokens per second: {m['tokens_per_second']:.1f}",
        f"TFLOP/s per device: {m['tflops_per_device']:.2f}",
    ]
    if m.get("mfu") is not None:
        parts.append(f"MFU: {100 * m['mfu']:.1f}% of {m['peak_tflops']:.0f} TFLOP/s")
    parts.append(f"peak memory (GiB): {m['peak_memory_gb']:.2f}")
    if m.get("skipped_iterations") is not None:
        parts.append(f"number of skipped iterations: {m['skipped_iterations']:3d}")
    if m.get("elapsed_seconds") is not None:
        parts.append(f"elapsed: {format_duration(m['elapsed_seconds'])}")
    if m.get("eta_seconds") is not None:
        parts.append(f"ETA: {format_duration(m['eta_seconds'])}")
    return " | ".join(parts) + " |"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded: ``27:46:40``), rounded to the second."""
    total = max(0, round(seconds))
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


Scalar = tuple[str, float, int]
"""``(tag, value, step)`` of one scalar point, as TensorBoard's ``add_scalar`` takes it."""

TOKENS_SUFFIX = " vs tokens"
"""Loss tags with this suffix are stepped by consumed tokens instead of iterations."""


def scalars_of(kind: str, record: dict[str, Any]) -> list[Scalar]:
    """The scalar points of one ``metrics.jsonl`` record: every numeric field as ``{kind}/{key}`` at the
    record's iteration, and every loss also as ``{kind}/{key} vs tokens`` at its consumed tokens. Every
    sink (TensorBoard, Weights & Biases) logs exactly this list, so they cannot drift apart."""
    it, tokens = record["iteration"], record["consumed_tokens"]
    out: list[Scalar] = []
    for key, value in record.items():
        if key in ("iteration", "consumed_tokens", "consumed_samples") or not isinstance(value, (int, float)):
            continue
        out.append((f"{kind}/{key}", value, it))
        if key.endswith("loss"):
            out.append((f"{kind}/{key}{TOKENS_SUFFIX}", value, tokens))
    return out


class ScalarSink(abc.ABC):
    """Where scalar points go: one call per record, with the record's iteration and consumed tokens."""

    @abc.abstractmethod
    def log(self, iteration: int, consumed_tokens: int, scalars: list[Scalar]) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class TensorBoardSink(ScalarSink):
    """``torch.utils.tensorboard.SummaryWriter`` in ``--tensorboard-dir``."""

    def __init__(self, directory: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=directory)

    def log(self, iteration: int, consumed_tokens: int, scalars: list[Scalar]) -> None:
        for tag, value, step in scalars:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class WandbOptions:
    """Megatron's ``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir`` (resolved)."""

    project: str
    exp_name: str | None
    save_dir: str
    config: dict[str, Any] = field(default_factory=dict)


class WandbSink(ScalarSink):
    """A Weights & Biases run (``wandb.init(project, name, dir, config)``; ``WANDB_MODE=offline`` works).

    Each record is one ``run.log(..., step=iteration)``: records of the same iteration (train, throughput,
    validation) share a row. The ``... vs tokens`` scalars, which TensorBoard steps by tokens, are in the
    same rows and declared with ``define_metric(tag, step_metric="consumed_tokens")``; every row carries
    ``consumed_tokens``.
    """

    def __init__(self, options: WandbOptions) -> None:
        import wandb

        os.makedirs(options.save_dir, exist_ok=True)
        self.run = wandb.init(
            project=options.project, name=options.exp_name, dir=options.save_dir, config=options.config
        )
        self.run.define_metric("consumed_tokens")
        self._token_axis: set[str] = set()

    def log(self, iteration: int, consumed_tokens: int, scalars: list[Scalar]) -> None:
        row: dict[str, Any] = {"consumed_tokens": consumed_tokens}
        for tag, value, _ in scalars:
            if tag.endswith(TOKENS_SUFFIX) and tag not in self._token_axis:
                self.run.define_metric(tag, step_metric="consumed_tokens")
                self._token_axis.add(tag)
            row[tag] = value
        self.run.log(row, step=iteration)

    def close(self) -> None:
        self.run.finish()


def wandb_options(cfg: TrainConfig) -> WandbOptions | None:
    """The run's W&B settings, or ``None`` without ``--wandb-project``. Files go to ``--wandb-save-dir``,
    else ``{--save}/wandb`` (Megatron's default)."""
    if not cfg.wandb_project:
        return None
    save_dir = cfg.wandb_save_dir or os.path.join(cfg.save, "wandb")
    config = {k: v for k, v in cfg.to_dict().items() if k != "user_ds_config"}
    return WandbOptions(cfg.wandb_project, cfg.wandb_exp_name, save_dir, config)


class MetricsWriter:
    """Rank 0's logs (no-op elsewhere): ``metrics.jsonl`` and TensorBoard scalars in ``--tensorboard-dir``,
    and the same scalars in Weights & Biases with ``--wandb-project``. Every record goes through
    ``scalars_of`` once and then to each sink."""

    def __init__(self, directory: str | None, enabled: bool, wandb: WandbOptions | None = None) -> None:
        self.enabled = enabled and (directory is not None or wandb is not None)
        self.sinks: list[ScalarSink] = []
        self.jsonl = None
        if not self.enabled:
            return
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            try:
                self.sinks.append(TensorBoardSink(directory))
            except ImportError:  # tensorboard is a declared dependency; stay useful without it
                print_rank_0("tensorboard is not installed: writing metrics.jsonl only")
            self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        if wandb is not None:
            self.sinks.append(WandbSink(wandb))

    @classmethod
    def for_run(cls, cfg: TrainConfig, enabled: bool) -> MetricsWriter:
        """The writer of a training run (``enabled`` on rank 0)."""
        return cls(cfg.tensorboard_dir, enabled, wandb_options(cfg) if enabled else None)

    def write(self, kind: str, record: dict[str, Any]) -> None:
        """Append one record (and flush the file)."""
        self.write_many(kind, [record])

    def write_many(self, kind: str, records: list[dict[str, Any]]) -> None:
        """Append records of one kind, flushing the file once at the end."""
        if not self.enabled:
            return
        for record in records:
            if self.jsonl is not None:
                self.jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
            scalars = scalars_of(kind, record)
            for sink in self.sinks:
                sink.log(record["iteration"], record["consumed_tokens"], scalars)
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
