"""Checkpoint manifests: the size and checksum of every file of a checkpoint, written before ``latest``.

``iter_XXXXXXX/manifest.json`` lists each file under the checkpoint directory (DeepSpeed's and ours) with
its size in bytes and an xxh3-128 digest (``xxhash``; about 15x faster than crc32 here). It is written
last inside the directory, after every rank has finished its files, and before ``latest`` moves: a
directory with a manifest is complete, and a manifest that verifies is a checkpoint whose bytes are those
that were written. Hashing is shared: with N ranks each hashes every N-th file and rank 0 writes the
union. ``kind`` is ``"training"`` (DeepSpeed state: resumable) or ``"weights"`` (model files only, e.g.
an HF import).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import xxhash

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
FORMAT = "megatron-cola-manifest"
ALGORITHM = "xxh3_128"
KINDS = ("training", "weights")
_CHUNK = 16 << 20


def file_digest(path: str) -> str:
    """The xxh3-128 hex digest of ``path``'s bytes."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(ckpt_dir: str) -> list[str]:
    """Every regular file under ``ckpt_dir`` (relative, sorted), the manifest and temp files excluded."""
    out = []
    for root, _, names in os.walk(ckpt_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir)
            if rel != MANIFEST_FILE and not name.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def file_entry(ckpt_dir: str, rel: str) -> dict[str, Any]:
    """The manifest entry of file ``rel`` of ``ckpt_dir``: its size and digest."""
    path = os.path.join(ckpt_dir, rel)
    return {"bytes": os.path.getsize(path), ALGORITHM: file_digest(path)}


def write_manifest_entries(ckpt_dir: str, iteration: int, kind: str, entries: dict[str, Any]) -> None:
    """Write the manifest of ``ckpt_dir`` from entries already hashed (``file_entry``); not collective."""
    if kind not in KINDS:
        raise ValueError(f"manifest kind {kind!r} is not one of {KINDS}")
    doc = {
        "format": FORMAT,
        "version": 1,
        "iteration": iteration,
        "kind": kind,
        "algorithm": ALGORITHM,
        "files": dict(sorted(entries.items())),
    }
    atomic_write_text(os.path.join(ckpt_dir, MANIFEST_FILE), json.dumps(doc, indent=1) + "\n")


def write_manifest(ckpt_dir: str, iteration: int, kind: str = "training") -> float:
    """Hash every file of ``ckpt_dir`` (shared across ranks) and write the manifest on rank 0.

    Collective when torch.distributed is initialised: every rank calls it after all ranks have finished
    writing their files. Returns the seconds this rank spent hashing.
    """
    if kind not in KINDS:
        raise ValueError(f"manifest kind {kind!r} is not one of {KINDS}")
    dist = _dist()
    rank, world = _rank_world()
    box = [checkpoint_files(ckpt_dir) if rank == 0 else None]
    if dist is not None:
        dist.broadcast_object_list(box, src=0)
    files: list[str] = box[0] or []
    start = time.perf_counter()
    mine = {rel: file_entry(ckpt_dir, rel) for rel in files[rank::world]}
    elapsed = time.perf_counter() - start
    entries: dict[str, Any] = {}
    for part in _gather(mine):
        entries.update(part)
    if rank == 0:
        write_manifest_entries(ckpt_dir, iteration, kind, entries)
    return elapsed


def read_manifest(ckpt_dir: str) -> dict[str, Any] | None:
    """The manifest of ``ckpt_dir``, or ``None`` when it has none (incomplete or pre-manifest)."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from e
    ok = isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("algorithm") == ALGORITHM
    if not ok or not isinstance(doc.get("files"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest with {ALGORITHM} digests")
    return doc


def find_problems(ckpt_dir: str, doc: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """What is wrong with files ``names`` (default: all) of ``ckpt_dir`` against ``doc``; [] if nothing."""
    problems = []
    for rel in names if names is not None else sorted(doc["files"]):
        want = doc["files"][rel]
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif (size := os.path.getsize(path)) != want["bytes"]:
            problems.append(f"{path} has {size} bytes, the manifest says {want['bytes']} (truncated?)")
        elif file_digest(path) != want[ALGORITHM]:
            problems.append(f"{path} does not match its {ALGORITHM} checksum (corrupted)")
    return problems


def verify_checkpoint(ckpt_dir: str, names: list[str] | None = None) -> list[str]:
    """Check ``ckpt_dir`` (or only its files ``names``) against its manifest; collective when
    torch.distributed is initialised (each rank hashes a share). Returns the problems found by any rank,
    [] when it verifies; a missing manifest is one problem."""
    rank, world = _rank_world()
    try:
        doc = read_manifest(ckpt_dir)
    except CheckpointError as e:
        return [str(e)]
    if doc is None:
        return [f"{ckpt_dir} has no {MANIFEST_FILE} (its save did not finish, or it predates manifests)"]
    listed = sorted(doc["files"])
    if names is not None:
        unknown = [n for n in names if n not in doc["files"]]
        if unknown:
            return [f"{os.path.join(ckpt_dir, unknown[0])} is not listed in {MANIFEST_FILE}"]
        listed = sorted(names)
    mine = find_problems(ckpt_dir, doc, listed[rank::world])
    return [p for part in _gather(mine) for p in part]
