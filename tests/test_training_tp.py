"""Tensor parallelism in pre-training: TP=2 x ZeRO-1 equals TP=1, TP=2 x DP=2 equals DP=2, exact resume
with TP=2, and layout errors (CPU, gloo). Resuming on another TP size: tests/test_resume_layouts.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT, dist_env, run_torchrun, synthetic_args
from .test_training import train_losses

pytestmark = pytest.mark.slow


def tp_args(prefix: str, *extra: str) -> list[str]:
    # NullTokenizer(255) has 256 ids: divisible by TP 2 after padding; 4 heads, rank 64, ffn 688 split too.
    args = synthetic_args(prefix, "--train-iters", "5", "--zero-stage", "1", *extra)
    args[args.index("--vocab-size") + 1] = "255"
    return args


def test_tp2_matches_tp1_and_resumes_exactly(synthetic_prefix: str, tmp_path) -> None:
    single = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pretrain_cola.py"),
            *tp_args(synthetic_prefix),
            "--tensorboard-dir",
            str(tmp_path / "tp1"),
        ],
        env=dist_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    run_torchrun(
        [
            *tp_args(synthetic_prefix, "--tensor-model-parallel-size", "2"),
            "--tensorboard-dir",
            str(tmp_path / "tp2"),
        ]
    )
    tp1, tp2 = train_losses(tmp_path / "tp1"), train_losses(tmp_path / "tp2")
    for it in range(1, 6):
        assert tp2[it] == pytest.approx(tp1[it], rel=1e-5), (it, tp1[it], tp2[it])

    # Stop after 2 steps and resume: the same losses as the uninterrupted TP=2 run. Without the
    # layout-free optimizer state (tests/test_resume_layouts.py resumes on another TP size with it).
    ckpt = tmp_path / "ckpt"
    common = tp_args(
        synthetic_prefix,
        "--tensor-model-parallel-size",
        "2",
        "--recompute",
        "cola-m",
        "--no-save-reshardable-optim",
    )
    run_torchrun(
        [*common, "--tensorboard-dir", str(tmp_path / "split"), "--save", str(ckpt), "--exit-interval", "2"]
    )
    assert sorted(p.name for p in (ckpt / "iter_0000002").glob("model_tp*.pt")) == [
        "model_tp00.pt",
        "model_tp01.pt",
    ]
    second = run_torchrun(
        [*common, "--tensorboard-dir", str(tmp_path / "split"), "--save", str(ckpt), "--load", str(ckpt)]
    )
    assert "resumed from" in second.stdout
    split = train_losses(tmp_path / "split")
    for it in range(1, 6):
        assert f"{split[it]:.6E}" == f"{tp2[it]:.6E}", (it, split[it], tp2[it])

    assert not list(ckpt.glob("iter_*/optim_tp*.pt"))
    # Without optim_tpNN.pt a TP=1 run cannot resume the TP=2 optimizer state, and says what to do.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pretrain_cola.py"),
            *tp_args(synthetic_prefix, "--train-iters", "6"),
            "--load",
            str(ckpt),
        ],
        env=dist_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "saved with tensor-model-parallel size 2" in proc.stderr and "--finetune" in proc.stderr
    assert "no layout-free optimizer state" in proc.stderr

    # --finetune loads the TP=2 weights into a TP=1 model: its first loss is the TP=2 run's last state.
    ft = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pretrain_cola.py"),
            *tp_args(synthetic_prefix, "--train-iters", "3"),
            "--load",
            str(ckpt),
            "--finetune",
            "--tensorboard-dir",
            str(tmp_path / "ft"),
        ],
        env=dist_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert train_losses(tmp_path / "ft")[1] < tp2[1] - 0.2


def test_tp2_dp2_matches_dp2(synthetic_prefix: str, tmp_path) -> None:
    """Through the trainer under the bottleneck scheme (the test above runs the default, split-rank)."""
    run_torchrun(
        [*tp_args(synthetic_prefix, "--train-iters", "3"), "--tensorboard-dir", str(tmp_path / "dp2")]
    )
    tp2 = ["--tensor-model-parallel-size", "2", "--cola-tp-scheme", "bottleneck"]
    proc = run_torchrun(
        [
            *tp_args(synthetic_prefix, "--train-iters", "3", *tp2),
            "--tensorboard-dir",
            str(tmp_path / "tp2dp2"),
        ],
        nproc=4,
    )
    assert "> tensor parallelism: bottleneck scheme, TP=2" in proc.stdout
    dp2, tp2dp2 = train_losses(tmp_path / "dp2"), train_losses(tmp_path / "tp2dp2")
    for it in range(1, 4):
        assert tp2dp2[it] == pytest.approx(dp2[it], rel=1e-5), (it, dp2[it], tp2dp2[it])


def test_indivisible_ffn_names_the_flag(synthetic_prefix: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pretrain_cola.py"),
            *tp_args(synthetic_prefix, "--tensor-model-parallel-size", "2", "--ffn-hidden-size", "687"),
        ],
        env={**dist_env(), "WORLD_SIZE": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--ffn-hidden-size 688" in proc.stderr
    assert "Traceback" not in proc.stderr
