"""The one seam through which checkpoint files are written and read.

``CheckpointWriter`` writes the files of one checkpoint directory atomically, then (``finalize``, on
every rank) a manifest of every file, and only then marks it complete (``latest``). ``CheckpointReader``
opens one checkpoint, verifies it against its manifest and reads its files. Files written by DeepSpeed
itself are announced to the writer with ``record``.

Our own files (model files, RNG states, the manifest) are read with ``torch.load(weights_only=True)``,
which refuses pickled Python objects; only DeepSpeed's engine/optimizer state is read with pickle
(``trusted=True``), and only to resume a run. Choosing which checkpoint to resume from (fallbacks,
corrupt ones moved aside) is in ``checkpoint.recovery``.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import warnings
from typing import Any

import numpy as np
import torch

from megatron_cola.atomic_io import atomic_open, atomic_write_text
from megatron_cola.checkpoint import manifest
from megatron_cola.checkpoint.layout import (
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    iteration_tag,
    read_latest,
    resolve_checkpoint_dir,
)
from megatron_cola.errors import CheckpointError

# What RNG files written before the plain-type format hold besides tensors: numpy's MT19937 state array.
_NUMPY_GLOBALS: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:  # numpy 2 keeps the reconstructor under numpy._core, numpy 1 under numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
_NUMPY_GLOBALS.append(_reconstruct)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary name beside ``path``, renamed into place when complete."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def safe_torch_load(path: str, mmap: bool = False, trusted: bool = False, allow_numpy: bool = False) -> Any:
    """``torch.load`` on the CPU; refuses pickled Python objects unless ``trusted`` (DeepSpeed's state).

    A truncated or unreadable file, or one holding objects a safe load refuses, raises ``CheckpointError``
    naming the file.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        if allow_numpy:
            with torch.serialization.safe_globals(_NUMPY_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} holds Python objects that a safe load (weights_only=True) refuses, so it was not "
            f"loaded ({first[:300]}). Megatron-CoLA's own files hold only tensors and plain types; "
            "do not load files from an untrusted source"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: it is truncated or corrupted ({str(e).splitlines()[0][:200]}); "
            "use an earlier checkpoint (--load DIR with another 'latest', or --iteration N)"
        ) from e


class CheckpointWriter:
    """Writes the files of checkpoint ``iteration`` under ``root`` and marks it complete.

    Every rank may write its own files; every rank calls ``finalize`` once all ranks are done (it writes
    the manifest), then exactly one rank calls ``commit``.
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

    def finalize(self, kind: str = "training") -> float:
        """Write the manifest (collective: every rank, after all ranks' files); returns hashing seconds."""
        return manifest.write_manifest(self.dir, self.iteration, kind)

    def commit(self) -> None:
        """Mark this checkpoint as the newest complete one (``latest``, then Megatron's iteration file)."""
        atomic_write_text(os.path.join(self.root, LATEST_FILE), self.tag + "\n")
        atomic_write_text(os.path.join(self.root, LATEST_ITERATION_FILE), f"{self.iteration}\n")


def tag_iteration(tag: str) -> int | None:
    """The iteration of an ``iter_XXXXXXX`` tag, or ``None`` for any other name."""
    m = re.fullmatch(r"iter_(\d+)", tag)
    return int(m.group(1)) if m else None


class CheckpointReader:
    """Reads the files of one checkpoint: ``iteration``, or the one ``latest`` names."""

    def __init__(self, root: str, iteration: int | None = None) -> None:
        self.root = root
        self.dir = resolve_checkpoint_dir(root, iteration)
        self.tag = os.path.basename(self.dir)
        self.iteration = tag_iteration(self.tag)

    @classmethod
    def latest(cls, root: str) -> CheckpointReader | None:
        """The checkpoint ``latest`` names under ``root``, or ``None`` when there is none yet."""
        if not os.path.isdir(root) or read_latest(root) is None:
            return None
        return cls(root)

    @property
    def manifest(self) -> dict[str, Any] | None:
        """This checkpoint's manifest, or ``None`` (a checkpoint written before manifests)."""
        return manifest.read_manifest(self.dir)

    def verify(self, names: list[str] | None = None) -> list[str]:
        """Problems of this checkpoint's files (or of ``names``) against its manifest; [] when it verifies.
        Collective under torch.distributed."""
        return manifest.verify_checkpoint(self.dir, names)

    def check_files(self, names: list[str]) -> None:
        """Raise ``CheckpointError`` when one of ``names`` does not match the manifest; warn when there is
        no manifest (a checkpoint written before manifests existed: unverified)."""
        if self.manifest is None:
            warnings.warn(
                f"{self.dir} has no {manifest.MANIFEST_FILE}: its files are unverified", stacklevel=2
            )
            return
        problems = self.verify(names)
        if problems:
            raise CheckpointError(
                f"checkpoint {self.dir} failed verification: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + "; use an earlier checkpoint (--iteration N)"
            )

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths of this checkpoint's files matching ``pattern``."""
        return sorted(glob.glob(os.path.join(self.dir, pattern)))

    def load_torch(
        self, name: str, mmap: bool = False, trusted: bool = False, allow_numpy: bool = False
    ) -> Any:
        """``torch.load`` file ``name`` (a path inside the directory, or a bare name) on the CPU, refusing
        pickled objects unless ``trusted`` (see ``safe_torch_load``)."""
        path = name if os.path.isabs(name) or os.path.dirname(name) else self.path(name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path} is missing from checkpoint {self.dir}")
        return safe_torch_load(path, mmap=mmap, trusted=trusted, allow_numpy=allow_numpy)
