"""The hang watchdog, the straggler report, and signals seen while the main thread is blocked.

**Hangs.** A rank that stops (a GPU Xid, an NFS stall, a deadlocked data worker, ``SIGSTOP``) holds every
other rank inside a collective until the backend's timeout, and nothing says which rank stopped or where.
A ``Watchdog`` thread on every rank watches the time since the last completed step (the trainer calls
``beat()`` after each step: a clock read, three attribute writes and a deque append; no I/O, no
collective, no device sync). When it exceeds the hang timeout, the rank that notices claims a directory
``SAVE_DIR/hang-<UTC time>`` (an atomic ``link`` of a per-run claim file, so every rank agrees on one
name), and every rank that still runs Python writes its stacks there, ``rank<N>.txt`` (``faulthandler``,
all threads): the ranks that are not past their own timeout yet see the claim within one poll and join.
After a grace period every reporting rank writes ``summary.txt`` naming the ranks that did not report,
the lowest one prints it as one line, each ``SIGKILL``s the silent ranks on its own host (a stopped
process never acts on ``SIGTERM``; the launcher would wait on it), and exits with status
``HANG_EXIT_CODE``; the job script's requeue restarts the job from the last checkpoint. A collective
cannot be used for any of this: the stopped rank would not join it. Files in ``--save`` are used because
every rank can reach it (checkpoints need that anyway) and nothing of it lives in a process that may be
the one stopped (a ``TCPStore`` is served by rank 0 or the launcher).

The hang timeout is ``--hang-timeout-minutes`` when given (0: off); otherwise ``HANG_MULTIPLE`` times the
slowest of the last ``RECENT_STEPS`` steps, at least ``HANG_FLOOR_S``. Until the first step completes,
and during a save or an evaluation (``enter_phase``), it is at least ``--distributed-timeout-minutes``:
those are legitimately long, and a collective stuck in them fails at that timeout anyway.

**Signals.** Python runs signal handlers only in the main thread, between bytecodes: while it waits in a
collective, ``--exit-signal-handler`` cannot even record a ``SIGTERM``. The watchdog sets
``signal.set_wakeup_fd`` so that the C-level handler writes each signal's number to a socket that a
thread of the watchdog reads at once. The first ``SIGTERM``/``SIGINT``/``SIGUSR1`` is the exit-signal
handler's (save at the next step boundary), and so is any within ``SECOND_SIGNAL_AFTER_S`` of it (Ctrl-C
and ``timeout`` signal the whole process group, and torchrun or DeepSpeed's launch.py forward it again);
a later one ends the rank at once with status 128 + the signal, whatever the main thread is doing.
Under DeepSpeed's local launch.py, a rank also watches the runner: killed alone, the runner forwards
nothing, so a rank that sees its launch.py orphaned sends itself ``SIGTERM``.

**Stragglers.** ``straggler_line`` gathers every rank's mean step time of the log window (one
all-gather of one float per rank, at the log interval only) and names the slowest and fastest rank.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

#: Exit status of a rank that the watchdog ends on a hang (torchrun reports 1 for the job; see
#: docs/reliability.md for what each launcher returns).
HANG_EXIT_CODE = 3
#: Default hang timeout: this many times the slowest recent step ...
HANG_MULTIPLE = 10.0
#: ... over the last this many steps ...
RECENT_STEPS = 20
#: ... and never less than this (seconds).
HANG_FLOOR_S = 300.0

#: Signals whose second arrival ends the rank at once (the first asks for a save; SIGINT: Ctrl-C).
ESCALATING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: Signals this soon after the first are the same request delivered twice (Ctrl-C or ``timeout`` signal
#: the whole process group, and torchrun or DeepSpeed's launch.py forward it again): they do not end the
#: rank; a signal later than this does.
SECOND_SIGNAL_AFTER_S = 5.0


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: enough to name it and to end it if it stops."""

    rank: int
    host: str
    pid: int


def gather_peers(run_start: float) -> tuple[list[Peer], str]:
    """Every rank's host and pid and a run id agreed by all (rank 0's start time and pid). Collective:
    called once at setup, never per step."""
    me = (socket.gethostname(), os.getpid(), f"{int(run_start)}-{os.getpid()}")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [Peer(0, me[0], me[1])], me[2]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return [Peer(r, host, pid) for r, (host, pid, _) in enumerate(everyone)], everyone[0][2]


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


class Watchdog:
    """The per-rank watchdog thread. ``start()`` in the main thread, ``beat()`` after every step,
    ``long_phase(...)`` around saves and evaluations, ``stop()`` at the end."""

    def __init__(
        self,
        rank: int,
        peers: list[Peer],
        run_id: str,
        save_dir: str | None,
        hang_timeout_minutes: float | None,
        distributed_timeout_minutes: float,
        exit_fn: Callable[[int], Any] = os._exit,
        second_signal_after_s: float = SECOND_SIGNAL_AFTER_S,
    ) -> None:
        self.rank = rank
        self.peers = peers
        self.run_id = run_id
        self.save_dir = save_dir
        self.explicit_s = None if hang_timeout_minutes is None else 60.0 * hang_timeout_minutes
        self.distributed_s = 60.0 * distributed_timeout_minutes
        self.exit_fn = exit_fn
        self.iteration = 0
        self.last_beat = time.monotonic()
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self.phase: str | None = "setup"
        self._phases: list[str | None] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup_fd = -1
        self._first_signal_at: float | None = None
        self.second_signal_after_s = second_signal_after_s
        self._launcher = _deepspeed_launcher()

    # ------------------------------------------------------------------------------- main thread API
    @property
    def enabled(self) -> bool:
        """Whether hangs are detected (``--hang-timeout-minutes 0`` turns it off)."""
        return self.explicit_s is None or self.explicit_s > 0

    def start(self) -> None:
        """Start the thread (and the signal wake-up socket: only the main thread may set it)."""
        if threading.current_thread() is threading.main_thread():
            r, w = socket.socketpair()
            r.setblocking(True)
            w.setblocking(False)
            try:
                self._previous_wakeup_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
                self._wakeup = (r, w)
            except ValueError:
                r.close()
                w.close()
        self.last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="megatron-cola-watchdog", daemon=True)
        self._thread.start()
        if self._wakeup is not None:
            threading.Thread(target=self._read_signals, name="megatron-cola-signals", daemon=True).start()

    def beat(self, iteration: int) -> None:
        """A step completed (called by the trainer after each step; cheap, no I/O)."""
        now = time.monotonic()
        if self.phase is None:
            self.recent.append(now - self.last_beat)
        self.iteration = iteration
        self.last_beat = now
        self.phase = None

    def enter_phase(self, name: str) -> None:
        """A save or an evaluation begins: the timeout is at least ``--distributed-timeout-minutes``
        until ``leave_phase``, and the time it takes does not count as a step."""
        self._phases.append(self.phase)
        self.phase = name
        self.last_beat = time.monotonic()

    def leave_phase(self) -> None:
        self.phase = self._phases.pop() if self._phases else None
        self.last_beat = time.monotonic()

    @contextlib.contextmanager
    def long_phase(self, name: str) -> Iterator[None]:
        """``enter_phase``/``leave_phase`` around a block."""
        self.enter_phase(name)
        try:
            yield
        finally:
            self.leave_phase()

    def stop(self) -> None:
        """Stop the thread and restore the previous wake-up fd."""
        self._stop.set()
        if self._wakeup is not None:
            if threading.current_thread() is threading.main_thread():
                signal.set_wakeup_fd(self._previous_wakeup_fd)
            r, w = self._wakeup
            self._wakeup = None
            with contextlib.suppress(OSError):
                r.shutdown(socket.SHUT_RDWR)  # wakes the reader thread's recv
            w.close()
            r.close()

    # ------------------------------------------------------------------------------- the thread
    def timeout_s(self) -> float:
        """The current hang timeout in seconds (``inf`` when off)."""
        if not self.enabled:
            return float("inf")
        if self.explicit_s is not None:
            base = self.explicit_s
        elif self.recent:
            base = max(HANG_FLOOR_S, HANG_MULTIPLE * max(self.recent))
        else:
            base = HANG_FLOOR_S
        if self.phase is not None:  # setup, the first step, a save, an evaluation
            base = max(base, self.distributed_s)
        return base

    def poll_s(self) -> float:
        t = self.timeout_s()
        return 5.0 if t == float("inf") else min(5.0, max(0.2, t / 10))

    def grace_s(self) -> float:
        """How long a rank that reported waits for the others: three polls, 2 to 60 s."""
        return min(60.0, max(2.0, 3 * self.poll_s()))

    @property
    def claim_path(self) -> str | None:
        return None if not self.save_dir else os.path.join(self.save_dir, f".hang-{self.run_id}")

    def _run(self) -> None:
        # Under DeepSpeed's launch.py the runner is looked for every second (one read of /proc).
        while not self._stop.wait(min(self.poll_s(), 1.0) if self._launcher else self.poll_s()):
            if self._launcher is not None and self._launcher.runner_gone():
                _say(
                    f"> rank {self.rank}: the deepspeed runner (pid {self._launcher.runner_pid}) is gone and "
                    "left its launch.py running: taking that as SIGTERM"
                )
                self._launcher = None
                os.kill(os.getpid(), signal.SIGTERM)
            claim = self.claim_path
            joined = claim is not None and os.path.exists(claim)
            idle = time.monotonic() - self.last_beat
            if joined or idle > self.timeout_s():
                if self._stop.is_set():
                    return
                self._report(idle, joined)
                return

    def _read_signals(self) -> None:
        wakeup = self._wakeup
        if wakeup is None:
            return
        r = wakeup[0]
        escalating = {int(s) for s in ESCALATING_SIGNALS}
        while not self._stop.is_set():
            try:
                data = r.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in escalating:
                    continue
                now = time.monotonic()
                if self._first_signal_at is None:
                    self._first_signal_at = now
                    continue
                if now - self._first_signal_at < self.second_signal_after_s:
                    continue  # the same request delivered twice (the process group and a launcher)
                name = signal.Signals(signum).name
                _say(f"> rank {self.rank}: second {name}: ending now (a save in progress is not finished)")
                self.exit_fn(128 + signum)
                return

    # ------------------------------------------------------------------------------- hang report
    def _claim_dir(self) -> str | None:
        """The hang directory every rank of this run writes to (the first to claim names it)."""
        claim = self.claim_path
        if claim is None or self.save_dir is None:
            return None
        os.makedirs(self.save_dir, exist_ok=True)
        if not os.path.exists(claim):
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            tmp = f"{claim}.tmp-{self.rank}"
            with open(tmp, "w") as f:
                f.write(f"hang-{stamp}\n")
            try:
                os.link(tmp, claim)  # atomic: fails if another rank claimed first
            except FileExistsError:
                pass
            finally:
                os.remove(tmp)
        with open(claim) as f:
            name = f.read().strip()
        path = os.path.join(self.save_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def _write_stacks(self, directory: str | None, idle: float) -> str:
        header = (
            f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}): no step completed for "
            f"{_fmt_s(idle)} after iteration {self.iteration}"
            + (f" (during: {self.phase})" if self.phase else "")
            + f"; hang timeout {_fmt_s(self.timeout_s())}\n\n"
        )
        if directory is None:
            sys.stderr.write(header)
            sys.stderr.flush()
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            return "stderr"
        final = os.path.join(directory, f"rank{self.rank}.txt")
        tmp = final + ".tmp"
        with open(tmp, "w") as f:
            f.write(header)
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def _report(self, idle: float, joined: bool) -> None:
        try:
            directory = self._claim_dir()
        except OSError as e:
            _say(f"> rank {self.rank}: cannot create the hang directory in {self.save_dir}: {e}")
            directory = None
        where = self._write_stacks(directory, idle)
        _say(f"> rank {self.rank}: no step for {_fmt_s(idle)} after iteration {self.iteration}: {where}")
        time.sleep(self.grace_s())  # the other ranks see the claim within one poll and report
        if directory is None:
            _say(
                f"> HANG: no training step completed for {_fmt_s(idle)} (rank {self.rank}); without --save "
                "the ranks cannot tell which of them stopped; stacks on stderr"
            )
            self.exit_fn(HANG_EXIT_CODE)
            return
        reported = sorted(
            int(n[4:-4]) for n in os.listdir(directory) if n.startswith("rank") and n.endswith(".txt")
        )
        missing = [p for p in self.peers if p.rank not in reported]
        names = ", ".join(f"{p.rank} ({p.host} pid {p.pid})" for p in missing) or "none"
        line = (
            f"HANG: no training step completed for {_fmt_s(self.timeout_s())} after iteration "
            f"{self.iteration}; ranks that did not report: {names}; Python stacks of the others in "
            f"{directory}; exiting with status {HANG_EXIT_CODE} so that the job can restart from the last "
            "checkpoint"
        )
        # Every reporting rank writes the summary (a launcher may end the others as soon as one exits);
        # the lowest one prints it, and the others exit a moment later so that it can.
        tmp = os.path.join(directory, f".summary.txt.tmp-{self.rank}")
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, os.path.join(directory, "summary.txt"))
        if reported and reported[0] == self.rank:
            _say("> " + line)
        else:
            time.sleep(1.0)
        here = socket.gethostname()
        for p in missing:
            if p.host == here and p.pid != os.getpid():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p.pid, signal.SIGKILL)  # stopped or stuck: SIGTERM would wait forever
        self.exit_fn(HANG_EXIT_CODE)


@dataclass
class _LauncherWatch:
    """DeepSpeed's ``runner`` starts ``launch.py``, which starts the ranks. The runner forwards no signal
    on a single node: killed alone (``kill``, ``timeout --foreground``, Ctrl-C from another shell), it
    leaves launch.py and every rank running. A rank sees it: launch.py, its parent, gets another parent."""

    launch_pid: int
    runner_pid: int

    def runner_gone(self) -> bool:
        return _parent_of(self.launch_pid) not in (self.runner_pid, None)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _deepspeed_launcher() -> _LauncherWatch | None:
    """The watch when this rank runs under DeepSpeed's local launch.py (Linux ``/proc``), else None."""
    launch = os.getppid()
    try:
        with open(f"/proc/{launch}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    runner = _parent_of(launch)
    if b"deepspeed.launcher.launch" not in cmdline or runner is None or runner <= 1:
        return None
    return _LauncherWatch(launch, runner)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------- stragglers
def straggler_line(step_time_s: float, device: torch.device, group: Any = None) -> str | None:
    """``--log-straggler``: the slowest and fastest rank's mean step time over the log window (one
    all-gather of one float per rank). Collective; returns the line on every rank (``None`` alone)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world = dist.get_world_size(group)
    mine = torch.tensor([step_time_s], dtype=torch.float64, device=device)
    times = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(times, mine, group=group)
    values = torch.cat(times).tolist()
    slow = max(range(world), key=lambda r: values[r])
    fast = min(range(world), key=lambda r: values[r])
    ratio = values[slow] / values[fast] if values[fast] > 0 else float("inf")
    return (
        f" straggler | step time (ms): slowest rank {slow} {1000 * values[slow]:.1f} | fastest rank "
        f"{fast} {1000 * values[fast]:.1f} | slowest/fastest {ratio:.2f}"
    )
