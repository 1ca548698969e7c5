"""Writing a checkpoint in the background (``--async-save``): the writer of our own behind DeepSpeed's
checkpoint-engine seam and ``CheckpointWriter``.

The training thread only snapshots: ``CheckpointWriter(background=True)`` copies every file's state into
host memory (``io.snapshot``; DeepSpeed's files reach it through ``deepspeed_state.WriterEngine``). Then
``BackgroundSave`` runs on a thread of every rank:

1. it writes this rank's files (flushed and fsynced) and hashes them (xxh3-128, as the manifest does);
2. it writes ``iter_XXXXXXX/.async-status-rankNNNNN.json``: the entries of the files it wrote, or what
   failed (file, rank, reason);
3. on rank 0 only, it waits for every rank's status file (a barrier through the file system, never a
   collective on the training process group from a second thread), and then either writes the manifest
   and ``latest`` (all ranks succeeded; the status files are removed first) or removes the partial
   directory and keeps the failure to report (any rank failed: ``latest`` never moves).

A kill at any point leaves ``latest`` on the previous complete checkpoint. The training side
(``training.checkpointing.AsyncSaves``) keeps at most one save in flight, reports a failure at the next
step, and waits for the pending save (and agrees on its outcome) before the next save and before exit.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.checkpoint.io import (
    CheckpointWriteError,
    CheckpointWriter,
    compact,
    failure_message,
    first_non_finite,
    write_failure,
    write_torch_file,
)
from megatron_cola.checkpoint.manifest import checkpoint_files, file_entry, write_manifest_entries
from megatron_cola.checkpoint.recovery import prune_checkpoints

STATUS_PREFIX = ".async-status-rank"
#: How long rank 0 waits for the other ranks' status files before it gives up on the save.
STATUS_TIMEOUT_S = 30 * 60.0


def status_file(rank: int) -> str:
    return f"{STATUS_PREFIX}{rank:05d}.json"


class BackgroundSave:
    """One checkpoint being written by a background thread of this rank (see the module docstring).

    ``error`` is set when this rank's part failed, or (rank 0) when any rank's did; ``committed`` when
    rank 0 moved ``latest``. ``log`` prints a line (rank 0's thread reports the commit and failures as they
    happen).
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        world_size: int,
        kind: str = "training",
        keep_last: int | None = None,
        log: Callable[[str], None] = print,
        status_timeout_s: float = STATUS_TIMEOUT_S,
        check_finite: dict[str, Any] | None = None,
    ) -> None:
        self.writer = writer
        self.check_finite = check_finite  # the snapshotted weights: none is written if one is not finite
        self.world_size = world_size
        self.kind = kind
        self.keep_last = keep_last
        self.log = log
        self.status_timeout_s = status_timeout_s
        self.error: str | None = None
        self.failures: list[dict[str, Any]] = []  # failed writes: this rank's, or (rank 0) every rank's
        self.committed = False
        self.seconds: float | None = None
        self._abort = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"async-save-{writer.tag}", daemon=True)

    @property
    def dir(self) -> str:
        return self.writer.dir

    def start(self) -> BackgroundSave:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def done(self) -> bool:
        return self._done.is_set()

    def join(self, abort: bool = False) -> None:
        """Wait for the thread. ``abort``: the run is ending on an error; rank 0 stops waiting for status
        files that are not there yet (this rank's own files are still written completely)."""
        if abort:
            self._abort.set()
        self._thread.join()

    # ------------------------------------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            self._write_mine()
            if self.writer.rank == 0:
                self._commit()
        except Exception as e:  # a bug, or a file system error outside the files (e.g. the status file)
            self.error = self.error or f"rank {self.writer.rank}: background save of {self.dir} failed: {e!r}"
        finally:
            self.seconds = time.perf_counter() - self._start
            self._done.set()

    def _write_mine(self) -> None:
        w = self.writer
        entries: dict[str, Any] = {}
        failures = list(w.failures)
        pending, w.pending = w.pending, []
        bad = first_non_finite(self.check_finite) if self.check_finite else None
        self.check_finite = None
        if bad is not None:
            failures.append(
                {"rank": w.rank, "path": w.dir, "reason": bad, "disk_full": False, "non_finite": True}
            )
            pending = []
        for name, obj, atomic in pending:
            try:
                # Our own files (atomic) keep one storage per tensor; DeepSpeed's keep its sharing.
                write_torch_file(compact(obj) if atomic else obj, os.path.join(w.dir, name), atomic=atomic)
                entries[name] = file_entry(w.dir, name)
            except CheckpointWriteError as e:
                failures.append(write_failure(w.rank, e))
        del pending  # the snapshots: host memory is given back as soon as they are on disk
        status = {"rank": w.rank, "files": entries, "failures": failures}
        atomic_write_text(os.path.join(w.dir, status_file(w.rank)), json.dumps(status) + "\n")
        if failures:
            self.failures = failures
            self.error = failure_message(w.root, w.dir, failures)

    def _commit(self) -> None:
        w = self.writer
        statuses = self._wait_for_statuses()
        if statuses is None:
            return
        failures = [f for s in statuses for f in s["failures"]]
        if failures:
            shutil.rmtree(w.dir, ignore_errors=True)  # every rank has finished writing into it
            self.failures = failures
            self.error = failure_message(w.root, w.dir, failures)
            self.log(f"> ERROR: the background save of {w.dir} failed: {self.error}")
            return
        entries: dict[str, Any] = {}
        for s in statuses:
            entries.update(s["files"])
        for r in range(self.world_size):
            os.remove(os.path.join(w.dir, status_file(r)))
        for rel in checkpoint_files(w.dir):  # a file no rank reported (none expected): hashed here
            if rel not in entries:
                entries[rel] = file_entry(w.dir, rel)
        write_manifest_entries(w.dir, w.iteration, self.kind, entries)
        w.commit()
        self.committed = True
        secs = time.perf_counter() - self._start
        self.log(f"> saved checkpoint {w.dir} (written in the background in {secs:.2f} s)")
        if self.keep_last:
            for d in prune_checkpoints(w.root, self.keep_last):
                self.log(f"> deleted {d} (--keep-last-checkpoints {self.keep_last})")

    def _wait_for_statuses(self) -> list[dict[str, Any]] | None:
        w = self.writer
        deadline = time.monotonic() + self.status_timeout_s
        found: dict[int, dict[str, Any]] = {}
        while True:
            for r in range(self.world_size):
                path = os.path.join(w.dir, status_file(r))
                if r not in found and os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        found[r] = json.load(f)
            if len(found) == self.world_size:
                return [found[r] for r in range(self.world_size)]
            missing = [r for r in range(self.world_size) if r not in found]
            if self._abort.is_set() or time.monotonic() > deadline:
                self.error = (
                    f"rank(s) {missing} did not finish writing {w.dir}"
                    + (
                        " before the run ended"
                        if self._abort.is_set()
                        else f" within {self.status_timeout_s:.0f} s"
                    )
                    + "; it was not marked complete and 'latest' still names the previous checkpoint"
                )
                return None
            time.sleep(0.02)
