"""Which checkpoint a run resumes from, and keeping complete checkpoints from being overwritten.

``select_checkpoint(root)`` never lets a run silently start over: with ``latest`` usable (its directory
exists and verifies against its manifest, or predates manifests) it is chosen; otherwise the newest
``iter_*`` directory that verifies is, with a note saying why; if ``iter_*`` directories exist but none
is usable, ``CheckpointError`` says what to do. Corrupt checkpoints that were skipped are reported so the
caller can move them aside (``move_aside``: renamed, never deleted) before a save could reuse the name.
All functions that verify are collective under torch.distributed (every rank calls them).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time

from megatron_cola.checkpoint.deepspeed_state import has_deepspeed_state
from megatron_cola.checkpoint.io import CheckpointReader, tag_iteration
from megatron_cola.checkpoint.layout import LATEST_FILE, read_latest
from megatron_cola.checkpoint.manifest import MANIFEST_FILE
from megatron_cola.errors import CheckpointError


@dataclasses.dataclass
class Selection:
    """The checkpoint chosen under a root: its reader, what kind it is, and what was said/skipped."""

    reader: CheckpointReader
    weights_only: bool  # model files only (an HF import): load them as weights, never resume from them
    notes: list[str]
    skipped: list[str]  # directories that failed verification (corrupt), newest first


def iteration_dirs(root: str) -> list[str]:
    """Tags of the ``iter_*`` directories under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    tags = [
        t for t in os.listdir(root) if tag_iteration(t) is not None and os.path.isdir(os.path.join(root, t))
    ]
    return sorted(tags, key=lambda t: tag_iteration(t) or 0, reverse=True)


def _kind(reader: CheckpointReader, finetune: bool) -> str:
    """``"training"`` or ``"weights"``; refuses a training checkpoint whose DeepSpeed files are gone
    (unless only its weights are wanted: ``finetune``)."""
    doc = reader.manifest
    if doc is not None:
        return str(doc.get("kind", "training"))
    names = os.listdir(reader.dir)
    if has_deepspeed_state(reader):
        return "training"
    trained = any(n.startswith("rng_state_") for n in names) or (reader.iteration or 0) > 0
    if trained and not finetune:
        raise CheckpointError(
            f"{reader.dir} was written by a training run but its DeepSpeed files (mp_rank_*_model_states.pt)"
            " are missing, so the run cannot resume exactly; restore them, pass --load with an earlier "
            "checkpoint, or --finetune to load only its weights"
        )
    return "weights"


def select_checkpoint(root: str, finetune: bool = False) -> Selection | None:
    """The checkpoint to start from under ``root``; ``None`` when it holds no ``iter_*`` directory.
    ``finetune``: only its model files will be read."""
    tags = iteration_dirs(root)
    latest = read_latest(root) if os.path.isdir(root) else None
    notes: list[str] = []
    skipped: list[str] = []
    candidates = tags
    if latest is None:
        if not tags:
            return None
        notes.append(f"{root}/{LATEST_FILE} is missing or empty")
    elif latest not in tags:
        notes.append(f"{root}/{LATEST_FILE} names {latest!r}, which is not a checkpoint directory there")
    else:
        reader = CheckpointReader(root, tag_iteration(latest))
        if reader.manifest is None:
            note = f"{reader.dir} predates checkpoint manifests: loading it unverified"
            return Selection(reader, _kind(reader, finetune) == "weights", [note], [])
        problems = reader.verify()
        if not problems:
            return Selection(reader, _kind(reader, finetune) == "weights", [], [])
        notes.append(f"WARNING: {LATEST_FILE} checkpoint {reader.dir} failed verification: {problems[0]}")
        skipped.append(reader.dir)
        candidates = [t for t in tags if (tag_iteration(t) or 0) < (tag_iteration(latest) or 0)]
    for tag in candidates:
        ckpt_dir = os.path.join(root, tag)
        if not os.path.exists(os.path.join(ckpt_dir, MANIFEST_FILE)):
            notes.append(f"{ckpt_dir} has no {MANIFEST_FILE} (a save that did not finish): skipped")
            continue
        reader = CheckpointReader(root, tag_iteration(tag))
        problems = reader.verify()
        if problems:
            notes.append(f"WARNING: {ckpt_dir} failed verification: {problems[0]}")
            skipped.append(ckpt_dir)
            continue
        notes.append(f"falling back to {ckpt_dir}, the newest complete and verified checkpoint")
        return Selection(reader, _kind(reader, finetune) == "weights", notes, skipped)
    raise CheckpointError(
        f"{root} holds checkpoint directories ({', '.join(tags[:3])}{', ...' if len(tags) > 3 else ''}) but "
        f"none is usable: {'; '.join(notes)}. Restore a good checkpoint, point --load at another directory, "
        "or move the iter_* directories away to start from scratch on purpose"
    )


def move_aside(ckpt_dir: str) -> str:
    """Rename a corrupt checkpoint directory to ``<dir>.corrupt-<unix time>`` (never delete); returns
    the new name. Not collective: one rank calls it."""
    new = f"{ckpt_dir}.corrupt-{int(time.time())}"
    os.replace(ckpt_dir, new)
    return new


def complete_checkpoints(root: str) -> list[str]:
    """Tags under ``root`` that are complete: they hold a manifest, or ``latest`` names them."""
    latest = read_latest(root) if os.path.isdir(root) else None
    return [
        t for t in iteration_dirs(root) if t == latest or os.path.exists(os.path.join(root, t, MANIFEST_FILE))
    ]


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """``--keep-last-checkpoints``: delete the complete checkpoints under ``root`` beyond the newest
    ``keep``; returns the deleted directories. Only directories with a manifest count and are deleted (each
    was hashed when it was written); the one ``latest`` names is never deleted, nor a directory without a
    manifest (a save that did not finish) or one moved aside as corrupt. Each is renamed aside first
    (``iter_XXXXXXX.deleting-<pid>``), then removed, so a kill midway never leaves a half-deleted
    checkpoint under its own name. Not collective: one rank calls it, after ``latest`` moved."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    latest = read_latest(root) if os.path.isdir(root) else None
    complete = [t for t in iteration_dirs(root) if os.path.exists(os.path.join(root, t, MANIFEST_FILE))]
    deleted = []
    for tag in complete[keep:]:
        if tag == latest:
            continue
        src = os.path.join(root, tag)
        aside = f"{src}.deleting-{os.getpid()}"
        os.replace(src, aside)
        shutil.rmtree(aside, ignore_errors=True)
        deleted.append(src)
    for name in os.listdir(root):  # what a kill in the middle of an earlier deletion left behind
        if re.fullmatch(r"iter_\d+\.deleting-\d+", name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return deleted
