"""The one seam through which checkpoint files are written and read.

``CheckpointWriter`` writes the files of one checkpoint directory atomically and, last, marks it complete
(``latest``); ``CheckpointReader`` opens a complete checkpoint and reads its files. Files written by
DeepSpeed itself are announced to the writer with ``record``. A manifest with checksums (written by
``commit``), its verification (in ``CheckpointReader.__init__``) and a fallback to the previous good
checkpoint (in ``CheckpointReader.latest``) belong here, so no caller has to change when they come.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

from megatron_cola.atomic_io import atomic_open, atomic_write_text
from megatron_cola.checkpoint.layout import (
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    iteration_tag,
    read_latest,
    resolve_checkpoint_dir,
)
from megatron_cola.errors import CheckpointError


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary name beside ``path``, renamed into place when complete."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


class CheckpointWriter:
    """Writes the files of checkpoint ``iteration`` under ``root`` and marks it complete.

    Every rank may write its own files; exactly one rank calls ``commit`` once all ranks are done.
    """

    def __init__(self, root: str, iteration: int) -> None:
        self.root = root
        self.iteration = iteration
        self.tag = iteration_tag(iteration)
        self.dir = os.path.join(root, self.tag)
        self.files: list[str] = []

    def path(self, name: str) -> str:
        """The path of file ``name`` of this checkpoint (its directory is created)."""
        os.makedirs(self.dir, exist_ok=True)
        return os.path.join(self.dir, name)

    def record(self, name: str) -> None:
        """Announce a file written by someone else (DeepSpeed) into this checkpoint."""
        self.files.append(name)

    def save_torch(self, name: str, obj: Any) -> str:
        """``torch.save`` ``obj`` as file ``name``, atomically; returns its path."""
        path = self.path(name)
        atomic_torch_save(obj, path)
        self.record(name)
        return path

    def commit(self) -> None:
        """Mark this checkpoint as the newest complete one (``latest``, then Megatron's iteration file)."""
        atomic_write_text(os.path.join(self.root, LATEST_FILE), self.tag + "\n")
        atomic_write_text(os.path.join(self.root, LATEST_ITERATION_FILE), f"{self.iteration}\n")


class CheckpointReader:
    """Reads the files of one complete checkpoint: ``iteration``, or the one ``latest`` names."""

    def __init__(self, root: str, iteration: int | None = None) -> None:
        self.root = root
        self.dir = resolve_checkpoint_dir(root, iteration)
        self.tag = os.path.basename(self.dir)

    @classmethod
    def latest(cls, root: str) -> CheckpointReader | None:
        """The newest complete checkpoint under ``root``, or ``None`` when there is none yet."""
        if not os.path.isdir(root) or read_latest(root) is None:
            return None
        return cls(root)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths of this checkpoint's files matching ``pattern``."""
        return sorted(glob.glob(os.path.join(self.dir, pattern)))

    def load_torch(self, name: str, mmap: bool = False) -> Any:
        """``torch.load`` file ``name`` (a path inside the directory, or a bare name) on the CPU."""
        path = name if os.path.isabs(name) or os.path.dirname(name) else self.path(name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing from checkpoint {self.dir}")
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
