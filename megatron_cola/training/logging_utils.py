"""Training logs: Megatron-shaped console lines, TensorBoard scalars and a ``metrics.jsonl`` per run."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

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
    return " | ".join(parts) + " |"


class MetricsWriter:
    """TensorBoard scalars and ``metrics.jsonl`` in ``--tensorboard-dir`` (rank 0 only; no-op elsewhere)."""

    def __init__(self, directory: str | None, enabled: bool) -> None:
        self.enabled = enabled and directory is not None
        self.tb = None
        self.jsonl = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=directory)
        except ImportError:  # tensorboard is a declared dependency; stay useful without it
            print_rank_0("tensorboard is not installed: writing metrics.jsonl only")
        self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

    def write(self, kind: str, record: dict[str, Any]) -> None:
        """Append one record (and flush the file)."""
        self.write_many(kind, [record])

    def write_many(self, kind: str, records: list[dict[str, Any]]) -> None:
        """Append records of one kind, flushing the file once at the end."""
        if not self.enabled:
            return
        for record in records:
            self.jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
            self._scalars(kind, record)
        self.jsonl.flush()

    def _scalars(self, kind: str, record: dict[str, Any]) -> None:
        if self.tb is None:
            return
        it, tokens = record["iteration"], record["consumed_tokens"]
        for key, value in record.items():
            if key in ("iteration", "consumed_tokens", "consumed_samples") or not isinstance(
                value, (int, float)
            ):
                continue
            self.tb.add_scalar(f"{kind}/{key}", value, it)
            if key.endswith("loss"):
                self.tb.add_scalar(f"{kind}/{key} vs tokens", value, tokens)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
