"""A real single-node SLURM cluster (munged, slurmctld, slurmd started here) runs the sbatch script.

Skipped when Slurm is not installed (``make setup-slurm``). Everything (slurm.conf for this host, state,
spool, logs, the munge key and socket) lives in a temporary directory; the daemons listen on free ports
and are stopped by PID. The jobs train the debug model on the synthetic corpus in both launch modes,
submitted from outside the repository, then a running job is cancelled and resubmitted to resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ROOT, dist_env, free_port

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch")
SBATCH = ROOT / "examples" / "slurm" / "pretrain_cola_7b.sbatch"


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if os.path.exists(f"{d}/{name}")), None
    )


def _slurm_conf(d: Path, host: str, sock: Path) -> str:
    return f"""ClusterName=colatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
KillWait=20
MinJobAge=600
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """The daemons' processes and the environment that points Slurm's commands at this cluster."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.procs: list[subprocess.Popen] = []
        self.env = {**dist_env(), "SLURM_CONF": str(d / "slurm.conf")}

    def start(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "munge"):
            (d / sub).mkdir()
        key, sock = d / "munge" / "munge.key", d / "munge" / "sock"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        host = socket.gethostname().split(".")[0]
        (d / "slurm.conf").write_text(_slurm_conf(d, host, sock))
        self._spawn(
            _which("munged"), "-F", "--force", f"--socket={sock}", f"--key-file={key}",
            f"--pid-file={d}/munge/pid", f"--log-file={d}/munge/log", f"--seed-file={d}/munge/seed",
        )  # fmt: skip
        _wait_for(lambda: sock.exists(), 20, "munged's socket")
        self._spawn(_which("slurmctld"), "-D", "-i", "-f", str(d / "slurm.conf"))
        self._spawn(_which("slurmd"), "-D", "-f", str(d / "slurm.conf"))
        _wait_for(self._node_idle, 60, "the node to be idle (see slurmd.log / slurmctld.log)")

    def _spawn(self, *cmd: str) -> None:
        log = open(self.dir / f"{Path(cmd[0]).name}.out", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-o", "%t", check=False).stdout
        return out.strip() in ("idle", "idle*") and "*" not in out

    def stop(self) -> None:
        """Cancel what is left (a failed test's job), so slurmd's step daemons end, then the daemons."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                try:
                    _wait_for(
                        lambda: not self.run("squeue", "-h", check=False).stdout.strip(), 60, "jobs to end"
                    )
                except AssertionError:
                    pass  # stop the daemons anyway
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=kw.pop("env", self.env), capture_output=True, text=True, check=check, **kw
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(w.split("=", 1) for w in out.split() if "=" in w)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        info: dict[str, str] = {}

        def done() -> bool:
            info.update(self.job(job_id))
            return info.get("JobState") in states

        _wait_for(done, timeout, f"job {job_id} to reach {states} (now {info.get('JobState')})")
        return info


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    missing = [n for n in DAEMONS if _which(n) is None]
    if missing:
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}): make setup-slurm")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _submit(cluster: Cluster, tmp: Path, name: str, save: Path, prefix: str, **env: str) -> str:
    """sbatch the debug recipe on 2 CPU ranks from a directory outside the checkout; returns the job id."""
    submit_dir = tmp / f"submit-{name}"
    submit_dir.mkdir(exist_ok=True)
    job_env = {
        **cluster.env,
        "SIZE": "debug",
        "DATA_PATH": prefix,
        "TOKENIZER_TYPE": "NullTokenizer",
        "TOKENIZER_MODEL": "none",
        "SAVE_DIR": str(save),
        "LOG_DIR": str(tmp / "logs"),
        "EXTRA_ARGS": "--vocab-size 256 --num-layers 2 --seq-length 64 --eval-iters 1",
        "LOG_INTERVAL": "1",
        **env,
    }
    proc = cluster.run(
        "sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
        "--gpus-per-node=0", "--time=10", str(SBATCH), env=job_env, cwd=submit_dir,
    )  # fmt: skip
    return proc.stdout.strip().split(";")[0]


def _attempt_log(tmp: Path, name: str, job_id: str, attempt: int = 0) -> str:
    return (tmp / "logs" / f"{name}-{job_id}.attempt{attempt}.log").read_text()


def _train_records(save: Path) -> list[tuple[int, float]]:
    """(iteration, lm loss) of every train log line, in the order written (runs append)."""
    rows = [json.loads(x) for x in (save / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["lm_loss"]) for r in rows if r.get("kind") == "train"]


def _first_iteration(log: str) -> int:
    """The first iteration an attempt logged (Megatron's ``iteration N/ TOTAL`` line)."""
    found = re.search(r"iteration\s+(\d+)/\s*\d+", log)
    assert found, log[-3000:]
    return int(found.group(1))


def _last_iteration(log: str) -> int:
    """The last iteration an attempt logged."""
    found = re.findall(r"iteration\s+(\d+)/\s*\d+", log)
    assert found, log[-3000:]
    return int(found[-1])


def _processes_of(save: Path) -> list[str]:
    """Command lines of live processes that mention ``save`` (launchers and ranks of that run)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(save) in cmd and int(p.name) != os.getpid():
            found.append(f"{p.name}: {cmd[:200]}")
    return found


def _latest(save: Path) -> int:
    try:
        return int((save / "latest").read_text().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return 0


ITERS = 30


@pytest.fixture(scope="module")
def srun_run(cluster: Cluster, synthetic_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The debug recipe for ITERS iterations in srun mode, submitted from outside the checkout."""
    tmp = tmp_path_factory.mktemp("srun")
    save, name = tmp / "ck", "cola-srun"
    job_id = _submit(cluster, tmp, name, save, synthetic_prefix, LAUNCH_MODE="srun", TRAIN_ITERS=str(ITERS))
    info = cluster.wait_state(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240)
    return {"tmp": tmp, "save": save, "name": name, "job_id": job_id, "info": info}


def test_sbatch_srun_mode_trains_from_outside_the_repo(srun_run: dict) -> None:
    """Exit state, checkpoint, per-attempt log and sbatch's own output in the submit directory."""
    tmp, save, name, job_id = srun_run["tmp"], srun_run["save"], srun_run["name"], srun_run["job_id"]
    log = _attempt_log(tmp, name, job_id)
    assert srun_run["info"]["JobState"] == "COMPLETED" and srun_run["info"]["ExitCode"] == "0:0", log[-3000:]
    assert "LAUNCH_MODE=srun" in log and "world 2 = TP 1 x DP 2" in log
    assert (save / "latest").read_text().strip() == f"iter_{ITERS:07d}"
    assert [it for it, _ in _train_records(save)] == list(range(1, ITERS + 1))
    assert not _processes_of(save)
    # sbatch's own output file is in the submit directory, not in slurmd's spool or the checkout.
    assert (tmp / f"submit-{name}" / f"{name}-{job_id}.out").exists()


_LIFTED: set[tuple[str, int]] = set()  # requeued jobs whose start delay was lifted


def _requeued(cluster: Cluster, job_id: str, restarts: int) -> bool:
    """True once the job was requeued ``restarts`` times; lifts Slurm's start delay of requeued jobs."""
    info = cluster.job(job_id)
    if info.get("Restarts") != str(restarts):
        return False
    if info.get("JobState") == "PENDING" and (job_id, restarts) not in _LIFTED:
        # Once, and not "now": slurmd refuses a batch launch whose credential dates from the second the
        # requeue revoked the previous one ("Job credential revoked"), which a requeue issued by the
        # script as its ranks exit (after they saved on SIGUSR1) would otherwise hit.
        _LIFTED.add((job_id, restarts))
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2", check=False)
    return info.get("JobState") in ("RUNNING", "COMPLETED")


def _assert_resumed_exactly(records: list[tuple[int, float]]) -> None:
    """Iterations trained twice (after a checkpoint, before a stop, then again after the resume) agree."""
    first: dict[int, float] = {}
    for it, loss in records:
        if it in first:
            assert loss == pytest.approx(first[it], rel=1e-6), f"iteration {it} after the resume"
        first.setdefault(it, loss)


def test_deepspeed_mode_scancel_resubmit_requeue_resume(
    cluster: Cluster, synthetic_prefix: str, srun_run: dict, tmp_path
) -> None:
    """scancel of a deepspeed-mode job stops every process after they saved at the iteration the SIGTERM
    reached (--exit-signal-handler); the resubmitted job resumes from there; the time-limit signal makes
    the ranks save at the iteration it reached, the job requeues itself (a new log) and resumes and
    finishes, with the losses of the uninterrupted srun-mode run."""
    save, name = tmp_path / "ck", "cola-resume"
    env = {"LAUNCH_MODE": "deepspeed", "TRAIN_ITERS": str(ITERS), "SAVE_INTERVAL": "2"}
    job1 = _submit(cluster, tmp_path, name, save, synthetic_prefix, **env)
    _wait_for(lambda: _latest(save) >= 2, 180, f"a first checkpoint in {save}")
    cluster.run("scancel", job1)
    assert cluster.wait_state(job1, ("CANCELLED",), 60)["JobState"] == "CANCELLED"
    _wait_for(lambda: not _processes_of(save), 30, f"every process of job {job1} to exit")
    stopped_at = _latest(save)
    time.sleep(3)  # nothing keeps training (or saving) after the cancel
    assert _latest(save) == stopped_at and not _processes_of(save)
    log1 = _attempt_log(tmp_path, name, job1)
    assert "stopping every rank" in log1 and "received SIGTERM" in log1
    # The save on the signal: at the last iteration trained, not only at the last periodic checkpoint.
    assert stopped_at == _last_iteration(log1), log1[-3000:]

    job2 = _submit(cluster, tmp_path, name, save, synthetic_prefix, **env)
    _wait_for(lambda: _latest(save) > stopped_at, 180, "the resubmitted job to save")
    # What #SBATCH --signal=B:USR1@300 sends ahead of the time limit.
    cluster.run("scancel", "--batch", "--signal=USR1", job2)
    _wait_for(lambda: _requeued(cluster, job2, 1), 60, "the job to requeue itself")
    info = cluster.wait_state(job2, ("COMPLETED", "FAILED", "CANCELLED"), 180)
    assert "SIGUSR1" in _attempt_log(tmp_path, name, job2, 0)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _attempt_log(
        tmp_path, name, job2, 1
    )
    assert _latest(save) == ITERS and not _processes_of(save)
    # Each attempt's first logged iteration: the resubmitted job starts right after the checkpoint the
    # cancel left, the requeued attempt right after the one its predecessor saved on SIGUSR1.
    log2 = _attempt_log(tmp_path, name, job2, 0)
    assert _first_iteration(log2) == stopped_at + 1
    assert "received SIGUSR1" in log2
    requeued_from = _first_iteration(_attempt_log(tmp_path, name, job2, 1)) - 1
    assert requeued_from > stopped_at and requeued_from == _last_iteration(log2), log2[-3000:]
    records = _train_records(save)
    assert {it for it, _ in records} == set(range(1, ITERS + 1))
    _assert_resumed_exactly(records)
    # Same recipe, same seed: deepspeed mode with two resumes gives the straight srun run's losses.
    straight = dict(_train_records(srun_run["save"]))
    assert [loss for it, loss in records] == pytest.approx([straight[it] for it, _ in records], rel=1e-6)
