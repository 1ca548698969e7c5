"""A lock on a ``--save`` directory for the life of a run: two runs writing the same directory would mix
their checkpoints (one run's iteration 2 beside the other's 4 and 6, each with a manifest that verifies).

``SAVE/.lock`` holds the holder's host, pid, the process start time and when it started (JSON). It is
created atomically (written to a temporary name, then hard-linked to ``.lock``, which fails if it
exists). A second run is refused with the holder named. A lock whose holder is gone is taken over with
a note: the same host and a pid that no longer runs (or runs a different process: another start time).
A holder on another host cannot be checked from here: the message says to delete the file if that run
is gone. Only rank 0 takes the lock; ``release`` removes it only if it is still ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

from megatron_cola.errors import CheckpointError

LOCK_FILE = ".lock"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (field 22 of ``/proc/PID/stat``), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return start_time is None or now is None or now == start_time


def describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}"


class SaveDirLock:
    """The lock of one ``--save`` directory (see the module docstring)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LOCK_FILE)
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "since": time.time(),
        }
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises ``CheckpointError``
        naming the holder when another run holds it."""
        os.makedirs(self.root, exist_ok=True)
        note = None
        for _ in range(3):
            if self._create():
                self.held = True
                return note
            holder = self._read()
            if holder is None:
                continue  # removed in the meantime (or half-written by a crash: see _read)
            if holder.get("host") == self.me["host"] and not _alive(
                int(holder["pid"]), holder.get("start_time")
            ):
                stale = f"{self.path}.stale-{os.getpid()}"
                with contextlib.suppress(FileNotFoundError):  # another run may take it over first
                    os.replace(self.path, stale)
                    os.remove(stale)
                    note = f"took over the lock of a run that is gone ({describe(holder)}): {self.path}"
                continue
            raise CheckpointError(
                f"--save {self.root} is in use by another run ({describe(holder)}; lock file {self.path}). "
                "Two runs saving into one directory mix their checkpoints: wait for that run to end, "
                f"choose another --save, or delete {self.path} if that run is gone"
            )
        raise CheckpointError(
            f"could not take the lock {self.path}: it keeps changing; is another run starting?"
        )

    def _create(self) -> bool:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Unreadable: not written by this code (it links only complete files); name it as it is.
            return {"host": "?", "pid": "?", "since": os.path.getmtime(self.path)}

    def release(self) -> None:
        """Remove the lock if this run still holds it."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
