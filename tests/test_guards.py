"""Run-time guards (``training/guards.py``): the non-finite step guard stops a diverged run without a
bad ``latest``; SIGTERM (one process, or one rank under torchrun) saves at the next step boundary, exits 0
and resumes exactly; ``--exit-duration-in-mins`` saves and exits; sign checks of the optimizer flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_cola.training.arguments import ArgumentError, build_train_config, parse_args

from .conftest import ROOT, dist_env, synthetic_args


def records(tb_dir, kind: str = "train") -> list[dict]:
    with open(os.path.join(tb_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def losses(tb_dir) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in records(tb_dir)}


def tensors_of(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def single(args: list[str], **kw) -> subprocess.Popen:
    """``pretrain_cola.py ARGS`` as one plain process (no launcher), unbuffered, output piped."""
    env = {**dist_env(), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "pretrain_cola.py"), *args]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    env = {**dist_env(), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(ROOT / "pretrain_cola.py"), *args]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 300) -> list[str]:
    """Read the output until a line holds ``needle``; returns the lines read."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line or time.time() > deadline:
            break
    assert any(needle in line for line in lines), "".join(lines[-40:])
    return lines


def finish(proc: subprocess.Popen, lines: list[str], timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return "".join(lines) + out


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


# ---------------------------------------------------------------------------------------------- flags
def flags(prefix: str, *extra: str):
    return build_train_config(parse_args(synthetic_args(prefix, "--train-iters", "10", *extra)), 1)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--min-lr", "-0.1"], "--min-lr must be >= 0"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
        (["--adam-eps", "0"], "--adam-eps must be > 0"),
        (["--max-consecutive-skipped-iters", "0"], "--max-consecutive-skipped-iters must be >= 1"),
        (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be > 0"),
    ],
)
def test_sign_checks_name_the_flag(synthetic_prefix: str, extra, message) -> None:
    with pytest.raises(ArgumentError) as e:
        flags(synthetic_prefix, *extra)
    assert message in str(e.value)


def test_guard_defaults_and_switches(synthetic_prefix: str) -> None:
    cfg = flags(synthetic_prefix)
    assert cfg.check_for_nan_in_loss_and_grad and cfg.exit_signal_handler
    assert cfg.max_consecutive_skipped_iters == 5 and cfg.exit_duration_in_mins is None
    cfg = flags(synthetic_prefix, "--no-check-for-nan-in-loss-and-grad", "--no-exit-signal-handler")
    assert not cfg.check_for_nan_in_loss_and_grad and not cfg.exit_signal_handler
    from megatron_cola.training.ds_config import build_ds_config

    assert build_ds_config(cfg)["bf16"]["check_grad_overflow"] is False


# ---------------------------------------------------------------------------------------- per-step cost
_COUNT_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from megatron_cola.training import guards
from megatron_cola.training.pretrain import pretrain

counts = {"steps": 0, "ops": [], "host_reads": 0, "collectives": 0}

class Ops(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        counts["ops"].append(str(func))
        if func is torch.ops.aten._local_scalar_dense.default:
            counts["host_reads"] += 1
        return func(*args, **(kwargs or {}))

def counted(method):
    def wrapper(*a, **k):
        with Ops():
            return method(*a, **k)
    return wrapper

real_tolist, real_all_reduce, real_before = torch.Tensor.tolist, dist.all_reduce, guards.RunGuard.before_step
def tolist(t):
    counts["host_reads"] += 1
    return real_tolist(t)
def all_reduce(*a, **k):
    counts["collectives"] += 1
    return real_all_reduce(*a, **k)
def before_step(self, losses):
    counts["steps"] += 1
    torch.Tensor.tolist, dist.all_reduce = tolist, all_reduce
    try:
        return counted(real_before)(self, losses)
    finally:
        torch.Tensor.tolist, dist.all_reduce = real_tolist, real_all_reduce
guards.RunGuard.before_step = before_step
guards.RunGuard.after_step = counted(guards.RunGuard.after_step)
runs = json.loads(sys.argv[1])
for args in runs:  # one run after the other in this process, each with its own counts
    for key in counts:
        counts[key] = [] if key == "ops" else 0
    pretrain(args)
    print("COUNTS", json.dumps(counts), flush=True)
"""


def test_guard_per_step_cost_on_one_rank(synthetic_prefix: str) -> None:
    """One rank with the NaN check, the exit-signal handler and a time limit on: the guards run no
    collective at all. Where DeepSpeed checks overflow (bf16, ZeRO-1) they add no device work and no host
    read to the step; where they hold the plain optimizer's step (fp32 ZeRO-0) they read one flag."""
    runs = []
    for zero, precision in (("1", ["--bf16"]), ("0", [])):
        args = synthetic_args(synthetic_prefix, "--train-iters", "3", "--zero-stage", zero, *precision)
        runs.append([*args, "--exit-duration-in-mins", "60", "--eval-iters", "0", "--device", "cpu"])
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_SCRIPT, json.dumps(runs)],
        env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COUNTS ")]
    deepspeed_checks, guard_checks = (json.loads(line[len("COUNTS ") :]) for line in lines)
    assert deepspeed_checks == {"steps": 3, "ops": [], "host_reads": 0, "collectives": 0}
    assert guard_checks["steps"] == 3 and guard_checks["collectives"] == 0
    assert guard_checks["host_reads"] == 3  # the flag the held step needs, once per step


# ---------------------------------------------------------------------------------------------- NaN
@pytest.mark.slow
@pytest.mark.parametrize("zero, precision", [("0", []), ("1", []), ("2", ["--bf16"])])
def test_nan_guard_skips_counts_and_stops_without_bad_latest(
    synthetic_prefix: str, tmp_path, zero: str, precision: list[str]
) -> None:
    """``--lr 1e6``: the loss goes NaN, the steps are skipped and counted, the run stops with an error
    after 3 in a row, and ``latest`` still names the finite checkpoint of iteration 1. ZeRO-0 in fp32
    is the path where DeepSpeed's optimizer has no overflow check and the guard holds the step; bf16
    ZeRO-2 relies on ``bf16.check_grad_overflow``, which the generated config sets."""
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    args = synthetic_args(
        synthetic_prefix, "--train-iters", "10", "--lr", "1e6", "--zero-stage", zero, *precision
    )
    args += ["--save", str(ckpt), "--save-interval", "1", "--tensorboard-dir", str(tb)]
    args += ["--max-consecutive-skipped-iters", "3"]
    proc = single(args)
    out = finish(proc, [])
    assert proc.returncode == 2, out[-3000:]
    assert "3 consecutive iterations (up to 4) had a non-finite loss" in out
    assert "--max-consecutive-skipped-iters 3" in out
    recs = records(tb)
    assert [r["skipped"] for r in recs] == [False, True, True]  # the failing step itself is not logged
    assert "number of skipped iterations:   1" in out
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    model = torch.load(ckpt / "iter_0000001" / "model_tp00.pt", map_location="cpu", weights_only=False)
    weights = tensors_of(model)
    assert weights and all(torch.isfinite(t).all() for t in weights if t.is_floating_point())


# ---------------------------------------------------------------------------------------------- exits
@pytest.mark.slow
def test_sigterm_single_process_saves_at_the_step_and_exits_0(synthetic_prefix: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    args = synthetic_args(synthetic_prefix, "--train-iters", "200", "--save", str(ckpt))
    proc = single(args)
    lines = wait_for_line(proc, " iteration        2/")
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, lines)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out and "(SIGTERM received (--exit-signal-handler))" in out
    last = max(
        int(line.split("/")[0].split()[-1])
        for line in out.splitlines()
        if " iteration " in line and "/" in line
    )
    assert 2 <= last < 200
    assert (ckpt / "latest").read_text().strip() == f"iter_{last:07d}"


@pytest.mark.slow
def test_sigterm_to_one_torchrun_rank_saves_and_resume_is_exact(synthetic_prefix: str, tmp_path) -> None:
    """SIGTERM reaches one rank only: the flags all-reduce makes both ranks stop at the same step
    boundary and save there; the resumed run's per-step losses equal a straight run's."""
    iters = 14
    common = synthetic_args(synthetic_prefix, "--train-iters", str(iters))
    ckpt, split_tb, straight_tb = tmp_path / "ckpt", tmp_path / "split", tmp_path / "straight"
    proc = torchrun([*common, "--save", str(ckpt), "--tensorboard-dir", str(split_tb)])
    lines = wait_for_line(proc, " iteration        2/")
    ranks = children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGTERM)
    out = finish(proc, lines)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(losses(split_tb))
    assert 2 <= stopped < iters, out[-3000:]
    assert (ckpt / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert f"exiting after iteration {stopped} (SIGTERM received" in out
    second = torchrun([*common, "--save", str(ckpt), "--load", str(ckpt), "--tensorboard-dir", str(split_tb)])
    out2 = finish(second, [])
    assert second.returncode == 0, out2[-3000:]
    straight = torchrun([*common, "--tensorboard-dir", str(straight_tb)])
    assert finish(straight, []) and straight.returncode == 0
    a, b = losses(split_tb), losses(straight_tb)
    assert sorted(a) == list(range(1, iters + 1))
    assert all(a[i] == b[i] for i in a), [(i, a[i], b[i]) for i in a if a[i] != b[i]]


@pytest.mark.slow
def test_exit_duration_saves_and_exits_0(synthetic_prefix: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    args = synthetic_args(synthetic_prefix, "--train-iters", "50", "--save", str(ckpt))
    proc = single([*args, "--exit-duration-in-mins", "0.0001"])
    out = finish(proc, [])
    assert proc.returncode == 0, out[-3000:]
    assert "exiting after iteration 1 (--exit-duration-in-mins 0.0001 reached)" in out
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_mpirun_saves_and_exits_0(synthetic_prefix: str, tmp_path, sig) -> None:
    """Open MPI's mpirun passes SIGUSR1 to every rank, and on SIGTERM sends the ranks SIGTERM before it
    kills them: either way they save at the iteration they reached (skipped without Open MPI/mpi4py)."""
    import shutil

    from .conftest import free_port

    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("Open MPI is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    pytest.importorskip("mpi4py")
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    cmd = [mpirun, "-np", "2", "--oversubscribe", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH"]
    cmd += ["-x", "PYTHONUNBUFFERED=1", "-x", f"MASTER_PORT={free_port()}"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, str(ROOT / "pretrain_cola.py")]
    cmd += synthetic_args(
        synthetic_prefix, "--train-iters", "200", "--save", str(ckpt), "--tensorboard-dir", str(tb)
    )
    env = {**dist_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = wait_for_line(proc, " iteration        2/")
    proc.send_signal(sig)
    out = finish(proc, lines)
    stopped = max(losses(tb))
    assert f"received {sig.name}" in out, out[-3000:]
    assert 2 <= stopped < 200
    assert (ckpt / "latest").read_text().strip() == f"iter_{stopped:07d}", out[-3000:]
    if sig == signal.SIGUSR1:
        assert proc.returncode == 0, out[-3000:]
