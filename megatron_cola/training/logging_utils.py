"""Training logs: Megatron-shaped console lines, TensorBoard scalars and a ``metrics.jsonl`` per run."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

import torch

# Dense bf16 peak TFLOP/s by GPU name fragment, for MFU.
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A800": 312.0, "L40": 181.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or ``None`` (CPU, unknown GPU): MFU is then not printed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / 2**30


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
        parts.append(f"MFU: {100 * m['mfu']:.1f}%")
    parts.append(f"peak memory (GB): {m['peak_memory_gb']:.2f}")
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
