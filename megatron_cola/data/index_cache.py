"""On-disk cache of dataset index arrays (document, sample and shuffle indices), shared by all ranks.

A cache entry is ``{cache_dir}/{base}-{name}.npy`` for each array plus ``{base}-description.json``, written
last, which marks the entry complete. ``base`` is derived from the dataset's configuration (path, split,
lengths, seed ...); the description also holds a digest of the ``.idx`` content, so an entry whose dataset
was re-preprocessed since (same path and configuration, other content) is recognised as stale, reported,
and rebuilt in place instead of being reused.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from megatron_cola.atomic_io import atomic_open, atomic_write_text

__all__ = ["load_or_build_indices"]


def _distributed() -> Any | None:
    """``torch.distributed`` when a process group is initialized, else None. torch is not imported here:
    if nothing imported it, no process group can exist (and importing it would cost a second)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _atomic_save(path: str, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _stale_reason(found: str, expected: str) -> str:
    """Which fields of two JSON descriptions differ (for the rebuild message)."""
    try:
        a, b = json.loads(found), json.loads(expected)
    except ValueError:
        return "unreadable description"
    fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "changed: " + ", ".join(fields) if fields else "different description"


def _state(paths: dict[str, str], desc_path: str, description: str) -> str:
    """``"complete"``, ``"missing"`` or the reason the entry is stale."""
    if not os.path.isfile(desc_path):
        return "missing"
    with open(desc_path, encoding="utf-8") as f:
        found = f.read()
    if found != description:
        return _stale_reason(found, description)
    if not all(os.path.isfile(p) for p in paths.values()):
        return "missing"
    return "complete"


def _load(paths: dict[str, str]) -> dict[str, np.ndarray] | None:
    try:
        return {name: np.load(p, mmap_mode="r", allow_pickle=False) for name, p in paths.items()}
    except (OSError, ValueError) as exc:
        warnings.warn(
            f"dataset index cache {next(iter(paths.values()))} unreadable ({exc}); rebuilding", stacklevel=3
        )
        return None


def load_or_build_indices(
    cache_dir: str,
    base: str,
    description: str,
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], bool]:
    """Return the arrays ``names`` from ``cache_dir/{base}-{name}.npy``, building and saving them first when
    missing or stale (rank 0 only in a distributed run; the others wait at a barrier, then load). The
    description file is written last and marks the set complete. Returns ``(arrays, built_here)``.

    Never fatal: when the cache cannot be written the indices stay in memory, and a rank that does not
    find rank 0's files (cache directory not shared between nodes) builds the same indices itself.
    """
    paths = {name: os.path.join(cache_dir, f"{base}-{name}.npy") for name in names}
    desc_path = os.path.join(cache_dir, f"{base}-description.json")
    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0
    arrays: dict[str, np.ndarray] | None = None
    if rank == 0:
        state = _state(paths, desc_path, description)
        if state == "complete":
            arrays = _load(paths)
        elif state != "missing":
            warnings.warn(
                f"dataset index cache {desc_path} is stale ({state}: the dataset was rewritten since the "
                "cache was built); rebuilding it",
                stacklevel=2,
            )
        if arrays is None:
            arrays = build()
            try:
                os.makedirs(cache_dir, exist_ok=True)
                if os.path.exists(desc_path):
                    os.remove(desc_path)  # the entry is incomplete until the new description lands
                for name in names:
                    _atomic_save(paths[name], arrays[name])
                atomic_write_text(desc_path, description)
            except OSError as exc:
                warnings.warn(
                    f"could not write the dataset index cache in {cache_dir} ({exc}); keeping it in memory",
                    stacklevel=2,
                )
            built = True
        else:
            built = False
    if dist is not None:
        dist.barrier()
    if rank == 0:
        assert arrays is not None
        return arrays, built
    if _state(paths, desc_path, description) == "complete":
        loaded = _load(paths)
        if loaded is not None:
            return loaded, False
    warnings.warn(
        f"rank {rank}: dataset index cache {desc_path} not found after rank 0 built it (cache directory "
        "not shared by all ranks?); building the same indices on this rank",
        stacklevel=2,
    )
    return build(), True
