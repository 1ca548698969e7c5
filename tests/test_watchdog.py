"""The hang watchdog, the straggler report and signal escalation (``training/watchdog.py``).

The end-to-end test stops one of two gloo ranks with ``SIGSTOP`` mid-run: the job must end non-zero
soon after the hang timeout, name the stopped rank, leave the surviving rank's stacks in
``SAVE_DIR/hang-*/rank0.txt``, leave no process behind, and a resubmission must resume from the last
checkpoint with the losses of the first run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_cola.training.arguments import ArgumentError, build_train_config, parse_args
from megatron_cola.training.watchdog import (
    HANG_EXIT_CODE,
    HANG_FLOOR_S,
    HANG_MULTIPLE,
    Peer,
    Watchdog,
)

from .conftest import ROOT, dist_env, synthetic_args


def _losses(tb: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in rows if r["kind"] == "train"}


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers (their ``RANK`` environment variable)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    out = {}
    for pid in pids:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
        out[rank] = pid
    return out


def _alive(pid: int) -> bool:
    """Running or stopped (a zombie, waiting for a parent that does not reap it, is not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _torchrun(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(ROOT / "pretrain_cola.py"), *args]
    env = {**dist_env(), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_sigstop_one_rank_names_it_dumps_stacks_and_resumes_exactly(synthetic_prefix: str, tmp_path) -> None:
    ckpt, tb1, tb2 = tmp_path / "ckpt", tmp_path / "tb1", tmp_path / "tb2"
    common = synthetic_args(
        synthetic_prefix, "--train-iters", "60", "--save", str(ckpt), "--save-interval", "8"
    )
    common += ["--hang-timeout-minutes", "0.05", "--distributed-timeout-minutes", "2"]
    log = tmp_path / "run1.log"
    t0 = time.time()
    with open(log, "w") as out:
        first_run = [*common, "--tensorboard-dir", str(tb1), "--log-straggler"]
        proc = _torchrun(first_run, stdout=out, stderr=subprocess.STDOUT)
    ranks: dict[int, int] = {}
    try:
        deadline = time.time() + 120
        while " iteration        9/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        print(f"iteration 9 after {time.time() - t0:.1f} s")
        ranks = _rank_pids(proc.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped_at = time.time()
        rc = proc.wait(timeout=3 + 60)  # the hang timeout plus a minute
        took = time.time() - stopped_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in ranks.values():  # never leave a stopped rank behind, even when an assertion failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert rc != 0, text[-3000:]
    assert "> HANG: no training step completed" in text, text[-3000:]
    assert "ranks that did not report: 1 (" in text and f"pid {ranks[1]})" in text, text[-3000:]
    assert f"exiting with status {HANG_EXIT_CODE}" in text
    straggler = [
        line for line in text.splitlines() if line.startswith(" straggler | step time (ms): slowest rank")
    ]
    assert len(straggler) >= 6 and " | fastest rank " in straggler[0], text[-3000:]
    # The surviving rank's stacks show where it waited: inside a training step.
    (hang_dir,) = ckpt.glob("hang-*")
    assert sorted(p.name for p in hang_dir.iterdir()) == ["rank0.txt", "summary.txt"]
    stacks = (hang_dir / "rank0.txt").read_text()
    assert "no step completed for" in stacks and "Current thread" in stacks
    assert "in train_step" in stacks and "in all_reduce" in stacks, stacks
    # Nothing is left behind, and waking the stopped rank changes nothing.
    assert not any(_alive(pid) for pid in ranks.values()), ranks
    latest = (ckpt / "latest").read_text()
    files = sorted(str(p) for p in ckpt.rglob("*"))
    with pytest.raises(ProcessLookupError):
        os.kill(ranks[1], signal.SIGCONT)  # reaped (torchrun waited for it after our SIGKILL)
    time.sleep(0.5)
    assert (ckpt / "latest").read_text() == latest and sorted(str(p) for p in ckpt.rglob("*")) == files
    print(f"hang detected and job ended {took:.1f} s after SIGSTOP (hang timeout 3 s)")
    # The resubmission resumes from the last checkpoint; its losses equal the first run's.
    first = _losses(tb1)
    resumed_from = int(latest.strip()[len("iter_") :])
    last = max(first)
    assert resumed_from < last, (resumed_from, first)
    proc2 = _torchrun(
        [*common, "--load", str(ckpt), "--tensorboard-dir", str(tb2), "--exit-interval", str(last)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    t1 = time.time()
    out2, _ = proc2.communicate(timeout=300)
    print(f"resume took {time.time() - t1:.1f} s")
    assert proc2.returncode == 0, out2[-3000:]
    assert f"resumed from {ckpt}/{latest.strip()}" in out2
    second = _losses(tb2)
    assert sorted(second) == list(range(resumed_from + 1, last + 1))
    assert all(second[i] == first[i] for i in second), [(i, first[i], second[i]) for i in second]
    # The resumed checkpoint carries the data history of the run (one stretch: nothing changed).
    states = torch.load(ckpt / f"iter_{last:07d}" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["data_history"] == [
        {"iteration": 0, "consumed_samples": 0, "data_path": [synthetic_prefix], "split": "90,5,5"}
    ]


# ---------------------------------------------------------------------------------------------- units
def _flags(prefix: str, *extra: str):
    return build_train_config(parse_args(synthetic_args(prefix, "--train-iters", "10", *extra)), 1)


def test_flags_defaults_and_checks(synthetic_prefix: str) -> None:
    cfg = _flags(synthetic_prefix)
    assert cfg.distributed_timeout_minutes == 10 and cfg.hang_timeout_minutes is None
    assert not cfg.log_straggler and not cfg.allow_data_change
    with pytest.raises(ArgumentError, match="--distributed-timeout-minutes must be > 0"):
        _flags(synthetic_prefix, "--distributed-timeout-minutes", "0")
    with pytest.raises(ArgumentError, match="--hang-timeout-minutes must be >= 0"):
        _flags(synthetic_prefix, "--hang-timeout-minutes", "-1")


def test_default_timeout_follows_the_step_time_with_a_floor() -> None:
    w = Watchdog(0, [Peer(0, "h", 1)], "run", None, None, distributed_timeout_minutes=10)
    assert w.timeout_s() == 600  # before the first step: the distributed timeout
    w.beat(1)  # the first step (setup and compilation) is not a step time
    assert w.timeout_s() == HANG_FLOOR_S and not w.recent
    w.last_beat -= 100.0  # a 100 s step
    w.beat(2)
    assert w.timeout_s() == pytest.approx(HANG_MULTIPLE * 100.0, rel=1e-3)
    with w.long_phase("saving"):
        assert w.timeout_s() == pytest.approx(max(600, HANG_MULTIPLE * 100.0), rel=1e-3)
    assert Watchdog(0, [], "r", None, 0.5, 10).timeout_s() == 600  # explicit, before the first step
    explicit = Watchdog(0, [], "r", None, 0.5, 10)
    explicit.beat(1)
    assert explicit.timeout_s() == 30
    off = Watchdog(0, [], "r", None, 0, 10)
    assert not off.enabled and off.timeout_s() == float("inf")


def test_second_signal_ends_the_rank_even_while_the_main_thread_waits() -> None:
    """The first SIGUSR1 is the exit-signal handler's (save at the next step boundary), and so is one
    right after it; a later one is seen by the watchdog's thread through the wake-up fd, without the
    main thread's help, and ends the rank."""
    exits: list[int] = []
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    peers = [Peer(0, "h", os.getpid())]
    w = Watchdog(0, peers, "run", None, 0, 10, exit_fn=exits.append, second_signal_after_s=0.5)
    w.start()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # at once: the same request twice (group + launcher)
        time.sleep(0.6)
        assert exits == [] and received and set(received) == {signal.SIGUSR1}
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not exits and time.time() < deadline:
            time.sleep(0.01)
        assert exits == [128 + signal.SIGUSR1]
    finally:
        w.stop()
        signal.signal(signal.SIGUSR1, previous)


# ---------------------------------------------------------------------------------------------- data
def test_data_change_is_refused_unless_allowed_and_kept_in_the_history(
    synthetic_prefix: str, tmp_path
) -> None:
    from megatron_cola.errors import CheckpointError
    from megatron_cola.training.checkpointing import initial_data_history, resumed_data_history

    other = str(tmp_path / "other_text_document")
    for ext in (".bin", ".idx"):
        Path(other + ext).write_bytes(Path(synthetic_prefix + ext).read_bytes())
    first = _flags(synthetic_prefix)
    saved = {"args": {"data_path": [synthetic_prefix], "split": "90,5,5"}}
    saved["data_history"] = initial_data_history(first)
    # The same data (also through another spelling of the same path) resumes with the same history.
    assert resumed_data_history(saved, first, 4, 64) == saved["data_history"]
    relative = _flags(os.path.relpath(synthetic_prefix))
    assert resumed_data_history(saved, relative, 4, 64) == saved["data_history"]
    # Another corpus or split: refused, naming both.
    with pytest.raises(CheckpointError) as e:
        resumed_data_history(saved, _flags(other), 4, 64)
    assert f"--data-path was {synthetic_prefix}, now {other}" in str(e.value)
    assert "consumed sample 64 (iteration 4)" in str(e.value) and "--allow-data-change" in str(e.value)
    with pytest.raises(CheckpointError, match="--split was 90,5,5, now 80,10,10"):
        resumed_data_history(saved, _flags(synthetic_prefix, "--split", "80,10,10"), 4, 64)
    # Allowed: the history grows by one entry at the resumed iteration.
    allowed = _flags(other, "--allow-data-change")
    history = resumed_data_history(saved, allowed, 4, 64)
    assert history == [
        *saved["data_history"],
        {"iteration": 4, "consumed_samples": 64, "data_path": [other], "split": "90,5,5"},
    ]
    # A checkpoint from before the history: its recorded flags stand for it.
    old = {"args": {"data_path": [synthetic_prefix], "split": "90,5,5"}}
    assert resumed_data_history(old, first, 4, 64) == saved["data_history"]
    with pytest.raises(CheckpointError, match="--data-path was"):
        resumed_data_history(old, _flags(other), 4, 64)


# ---------------------------------------------------------------------------------------------- timeouts
_GROUP_TIMEOUT_SCRIPT = r"""
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from megatron_cola.parallel import ParallelState, set_default_group_timeout

rank, port, done = int(sys.argv[1]), sys.argv[2], sys.argv[3]
timeout = timedelta(seconds=2)
set_default_group_timeout(timeout)
url = f"tcp://127.0.0.1:{port}"
dist.init_process_group("gloo", init_method=url, rank=rank, world_size=2, timeout=timedelta(seconds=60))
ours = ParallelState.from_torch_distributed(1, timeout=timeout).dp_group
theirs = dist.new_group([0, 1])  # as DeepSpeed creates its groups: no timeout given
if rank == 1:  # joins neither collective; leaves once rank 0 is done (at most 30 s)
    deadline = time.time() + 30
    while not os.path.exists(done) and time.time() < deadline:
        time.sleep(0.05)
    os._exit(0)
for name, group in (("ours", ours), ("deepspeed-style", theirs)):
    start = time.time()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        print(name, "no error", flush=True)
    except RuntimeError:
        print(name, f"timed out after {time.time() - start:.1f} s", flush=True)
open(done, "w").close()
os._exit(0)
"""


def test_distributed_timeout_reaches_our_groups_and_deepspeeds(tmp_path) -> None:
    """A collective of a group we create, and of one created without a timeout (as DeepSpeed does),
    fails after --distributed-timeout-minutes instead of torch's 30-minute gloo default."""
    from .conftest import free_port

    script = tmp_path / "groups.py"
    script.write_text(_GROUP_TIMEOUT_SCRIPT)
    port, done = str(free_port()), str(tmp_path / "done")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), port, done],
            env=dist_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    out = [p.communicate(timeout=120)[0] for p in procs]
    lines = [x for x in out[0].splitlines() if x.startswith(("ours", "deepspeed-style"))]
    assert len(lines) == 2, out
    for line, name in zip(lines, ("ours", "deepspeed-style")):
        assert line.startswith(f"{name} timed out after "), out
        assert float(line.split()[-2]) < 6, out  # torch's default for gloo: 30 minutes
