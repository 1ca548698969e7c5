"""The one seam through which checkpoint files are written and read.

``CheckpointWriter`` writes the files of one checkpoint directory, then (``finalize``, on every rank) a
manifest of every file, and only then marks it complete (``latest``). DeepSpeed's own files reach it
through DeepSpeed's checkpoint-engine seam (``deepspeed_state.save_engine_state``). A file that cannot be
written does not raise on the spot: the writer records the failure (naming the file and the rank) so that
every rank still reaches the collectives of the save, and the ranks agree on success before the manifest
(``training.checkpointing``). With ``background=True`` (``--async-save``) nothing is written yet: each
file's state is copied into host memory (``snapshot``) and ``pending`` holds it for the background writer
(``checkpoint.async_save``). ``CheckpointReader`` opens one checkpoint, verifies it against its manifest
and reads its files.

Our own files (model files, RNG states, the manifest) are read with ``torch.load(weights_only=True)``,
which refuses pickled Python objects; only DeepSpeed's engine/optimizer state is read with pickle
(``trusted=True``), and only to resume a run. Choosing which checkpoint to resume from (fallbacks,
corrupt ones moved aside) is in ``checkpoint.recovery``.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import errno
import glob
import os
import pickle
import re
import shutil
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


class CheckpointWriteError(CheckpointError):
    """A checkpoint file could not be written: ``path``, ``reason`` and whether the disk is full."""

    def __init__(self, path: str, reason: str, disk_full: bool) -> None:
        super().__init__(f"could not write {path}: {reason}")
        self.path = path
        self.reason = reason
        self.disk_full = disk_full


def write_torch_file(obj: Any, path: str, atomic: bool = True) -> None:
    """``torch.save`` ``obj`` to ``path``, flushed and fsynced (durable when it returns).

    ``atomic``: through a temporary name (our own files); otherwise straight to ``path``, as DeepSpeed
    writes its files (the manifest, written last, is what marks a checkpoint complete). Through a Python
    file object, so that a full disk surfaces as ENOSPC rather than torch's "iostream error / unexpected
    pos". On failure the partial file is removed and ``CheckpointWriteError`` names the file.
    """
    try:
        if atomic:
            atomic_torch_save(obj, path)
            return
        try:
            with open(path, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
    except (OSError, RuntimeError, pickle.PicklingError) as e:
        full = is_disk_full(e, path)
        reason = "no space left on device" if full else _first_line(e)
        raise CheckpointWriteError(path, reason, full) from e


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def is_disk_full(err: BaseException, where: str) -> bool:
    """Whether ``err`` (or what caused it) is ENOSPC, or ``where``'s file system has under 16 MiB left
    (torch's C++ writer reports a full disk only as 'iostream error' / 'file write failed')."""
    e: BaseException | None = err
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        e = e.__cause__ or e.__context__
    probe = where
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free < (16 << 20)
    except OSError:
        return False


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor of ``state`` holding NaN or +-Inf, or ``None``. NaN and Inf show in
    a tensor's min or max (``aminmax`` propagates NaN): 14x faster on the CPU than ``isfinite(t).all()``
    in bf16."""
    for name, t in state.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                return name
    return None


class HostBuffers:
    """Host-memory storages kept from one background save to the next (``--async-save``; torchtitan's
    ``async_with_pinned_mem`` keeps its buffers the same way). Copying into memory that was touched
    before is several times faster than into fresh pages: 3 GB took 13.4 s into new memory and 1.3 s
    into reused memory on the 2-core development machine (page faults on first touch). Costs one copy
    of the checkpoint state in host memory for the life of the run."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._used: list[torch.UntypedStorage] = []

    def take(self, nbytes: int) -> torch.UntypedStorage:
        """A host storage of ``nbytes`` bytes (reused when one is free)."""
        free = self._free.get(nbytes)
        storage = free.pop() if free else torch.UntypedStorage(nbytes)
        self._used.append(storage)
        return storage

    def release_all(self) -> None:
        """Every storage handed out is free again (call once nothing reads them any more)."""
        for storage in self._used:
            self._free.setdefault(storage.nbytes(), []).append(storage)
        self._used = []


def host_copy(t: torch.Tensor, buffers: HostBuffers | None = None) -> torch.Tensor:
    """A contiguous copy of ``t`` in host memory (in ``buffers`` when given)."""
    t = t.detach()
    if buffers is None:
        return t.to("cpu", copy=True)
    out = torch.empty((0,), dtype=t.dtype).set_(buffers.take(t.numel() * t.element_size()), 0, t.size())
    return out.copy_(t)


def snapshot(obj: Any, memo: dict[Any, Any] | None = None, buffers: HostBuffers | None = None) -> Any:
    """A copy of ``obj`` whose tensors live in host memory of their own (in ``buffers`` when given):
    what a background writer may serialise while training goes on. Dicts, lists and tuples are copied;
    tensors that share a storage still share one copy (so the file written is the one ``torch.save``
    would write from ``obj``); other values are immutable or not changed by training (configs) and are
    kept as they are."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.device, storage.nbytes())
        copy = memo.get(key)
        if copy is None:
            if buffers is not None:
                copy = buffers.take(storage.nbytes())
                copy.copy_(storage)
            else:
                copy = storage.cpu() if storage.device.type != "cpu" else storage.clone()
            memo[key] = copy
        out = torch.empty((0,), dtype=t.dtype).set_(copy, t.storage_offset(), t.size(), t.stride())
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        return out.requires_grad_(obj.requires_grad) if obj.requires_grad and out.is_floating_point() else out
    if isinstance(obj, dict):
        new = copy_module.copy(obj)
        for k, v in obj.items():
            new[k] = snapshot(v, memo, buffers)
        return new
    if isinstance(obj, list):
        return [snapshot(v, memo, buffers) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot(v, memo, buffers) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


def compact(obj: Any) -> Any:
    """``obj`` with every tensor that is a view into a larger storage replaced by a copy of its own, so
    that ``torch.save`` writes only its elements (our own files hold one storage per tensor)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    if isinstance(obj, dict):
        new = copy_module.copy(obj)
        for k, v in obj.items():
            new[k] = compact(v)
        return new
    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if isinstance(obj, tuple):
        items = [compact(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


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

    Every rank may write its own files (``save_torch``; DeepSpeed's through ``write_torch``); a failed
    write lands in ``failures`` instead of raising. Then every rank calls ``finalize`` once all ranks are
    done and agree that none failed (it writes the manifest), then exactly one rank calls ``commit``.
    With ``background`` the files are only snapshotted into ``pending`` (``--async-save``).
    """

    def __init__(
        self,
        root: str,
        iteration: int,
        rank: int = 0,
        background: bool = False,
        buffers: HostBuffers | None = None,
    ) -> None:
        self.root = root
        self.buffers = buffers  # where background snapshots go (kept between saves)
        self.memo: dict[Any, Any] = {}  # storages snapshotted in this save: each is copied once
        self.iteration = iteration
        self.tag = iteration_tag(iteration)
        self.dir = os.path.join(root, self.tag)
        self.rank = rank
        self.background = background
        self.files: list[str] = []
        self.failures: list[dict[str, Any]] = []  # ``write_failure``s of this rank
        self.pending: list[tuple[str, Any, bool]] = []  # (name, host-memory state, atomic)

    def path(self, name: str) -> str:
        """The path of file ``name`` of this checkpoint (its directory is created)."""
        os.makedirs(self.dir, exist_ok=True)
        return os.path.join(self.dir, name)

    def record(self, name: str) -> None:
        """Announce a file written by someone else into this checkpoint."""
        self.files.append(name)

    def write_torch(self, name: str, obj: Any, atomic: bool = True, owned: bool = False) -> str:
        """Write ``obj`` as file ``name`` (a path relative to the checkpoint directory) now, or queue a
        snapshot of it for the background writer (``owned``: ``obj`` is a copy nobody else changes, so
        it is queued as it is). Returns its path; a failure is recorded in ``failures``."""
        path = self.path(name)
        self.record(name)
        if self.background:
            self.pending.append((name, obj if owned else snapshot(obj, self.memo, self.buffers), atomic))
            return path
        try:
            write_torch_file(obj, path, atomic=atomic)
        except CheckpointWriteError as e:
            self.failures.append(write_failure(self.rank, e))
        return path

    def save_torch(self, name: str, obj: Any) -> str:
        """Our own file ``name`` (``obj`` freshly built, owned by the writer), atomically; its path."""
        return self.write_torch(name, obj, atomic=True, owned=True)

    def finalize(self, kind: str = "training") -> float:
        """Write the manifest (collective: every rank, after all ranks' files); returns hashing seconds."""
        return manifest.write_manifest(self.dir, self.iteration, kind)

    def commit(self) -> None:
        """Mark this checkpoint as the newest complete one (``latest``, then Megatron's iteration file)."""
        atomic_write_text(os.path.join(self.root, LATEST_FILE), self.tag + "\n")
        atomic_write_text(os.path.join(self.root, LATEST_ITERATION_FILE), f"{self.iteration}\n")


def write_failure(rank: int, err: CheckpointWriteError) -> dict[str, Any]:
    """A failed write as plain values (gathered across ranks, or sent through a status file)."""
    return {"rank": rank, "path": err.path, "reason": err.reason, "disk_full": err.disk_full}


def failure_message(root: str, ckpt_dir: str, failures: list[dict[str, Any]]) -> str:
    """The error of a save that failed on some rank(s): the first file and rank, how many more, the last
    complete checkpoint, and that the partial directory was removed."""
    first = failures[0]
    if first.get("non_finite"):
        what = (
            f"parameter {first['reason']} holds NaN/Inf (rank {first['rank']}): {ckpt_dir} was not completed"
        )
    elif first["disk_full"]:
        what = f"no space left on device while writing {first['path']} (rank {first['rank']})"
    else:
        what = f"rank {first['rank']} could not write {first['path']}: {first['reason']}"
    if len(failures) > 1:
        ranks = sorted({f["rank"] for f in failures})
        what += f" (and {len(failures) - 1} more failed write(s); ranks {ranks})"
    last = read_latest(root) if os.path.isdir(root) else None
    return (
        f"{what}; the last complete checkpoint is "
        f"{os.path.join(root, last) if last else 'none (nothing was saved yet)'}. The partial {ckpt_dir} "
        f"was removed; "
        + (
            "lower --lr or resume from it"
            if first.get("non_finite")
            else f"{'free space' if first['disk_full'] else 'repair the disk'} or choose another --save"
        )
    )


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
