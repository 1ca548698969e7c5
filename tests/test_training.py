"""Pre-training on DeepSpeed (CPU, gloo, 2 processes): loss goes down, ZeRO stages agree, exact resume,
the generated DeepSpeed config, and the messages of bad flag combinations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from megatron_cola.errors import ConfigError
from megatron_cola.training.arguments import ArgumentError, build_train_config, parse_args
from megatron_cola.training.ds_config import build_ds_config
from megatron_cola.training.schedule import lr_at

from .conftest import ROOT, dist_env, run_torchrun, synthetic_args


def train_losses(tb_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(tb_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == "train":
                out[rec["iteration"]] = rec["lm_loss"]
    return out


# ---------------------------------------------------------------------------------------------- flags
def args_for(prefix: str, *extra: str, world_size: int = 2):
    return build_train_config(parse_args(synthetic_args(prefix, "--train-iters", "10", *extra)), world_size)


def test_ds_config_matches_flags(synthetic_prefix: str) -> None:
    args = args_for(
        synthetic_prefix, "--zero-stage", "3", "--bf16", "--clip-grad", "0.7", "--global-batch-size", "32"
    )
    cfg = build_ds_config(args)
    assert cfg["train_batch_size"] == 32
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4  # 32 = 4 x 2 ranks x 4
    assert cfg["gradient_clipping"] == 0.7
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert cfg["zero_optimization"]["stage"] == 3
    assert "fp16" not in cfg and "optimizer" not in cfg


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_overlaps_communication_on_cuda_only(synthetic_prefix: str, stage: int) -> None:
    args = args_for(synthetic_prefix, "--zero-stage", str(stage))
    assert build_ds_config(args, "cuda")["zero_optimization"]["overlap_comm"] is True
    assert build_ds_config(args, "cpu")["zero_optimization"]["overlap_comm"] is False
    on_cpu = args_for(synthetic_prefix, "--zero-stage", str(stage), "--device", "cpu")
    assert build_ds_config(on_cpu)["zero_optimization"]["overlap_comm"] is False  # --device resolved
    on_gpu = args_for(synthetic_prefix, "--zero-stage", str(stage), "--device", "cuda")
    assert build_ds_config(on_gpu)["zero_optimization"]["overlap_comm"] is True


def test_user_ds_config_kept_and_checked(synthetic_prefix: str, tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 123}, "bf16": {"enabled": True}})
    )
    args = args_for(synthetic_prefix, "--deepspeed_config", str(path))
    cfg = build_ds_config(args)
    assert cfg["zero_optimization"] == {**cfg["zero_optimization"], "stage": 2, "reduce_bucket_size": 123}
    assert args.bf16 and cfg["bf16"]["enabled"]
    with pytest.raises(ArgumentError, match="contradicts"):
        args_for(synthetic_prefix, "--deepspeed_config", str(path), "--zero-stage", "1")
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ArgumentError, match="train_batch_size=64 contradicts"):
        args_for(synthetic_prefix, "--deepspeed_config", str(path))


@pytest.mark.parametrize(
    "extra, world, message",
    [
        (["--global-batch-size", "12"], 2, "not divisible by --micro-batch-size 4 x data-parallel size 2"),
        (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
        (["--model-size", "13B"], 2, "unknown --model-size"),
        (["--fp16"], 2, "use --bf16"),
        (["--full-rank", "--recompute", "cola-m"], 2, "needs a CoLA model"),
        (["--min-lr", "1.0"], 2, "larger than --lr"),
        (["--save-interval", "5"], 2, "needs --save"),
        (["--train-tokens", "1000"], 2, "not both"),
        (["--peak-tflops", "0"], 2, "--peak-tflops must be a positive"),
    ],
)
def test_bad_flags_have_messages(synthetic_prefix: str, extra, world, message) -> None:
    with pytest.raises(
        ConfigError, match=message
    ):  # ArgumentError, or the shared TP-size check's ConfigError
        args_for(synthetic_prefix, *extra, world_size=world)


def test_missing_data_path_message(tmp_path) -> None:
    argv = synthetic_args(str(tmp_path / "nope"), "--train-iters", "3")
    with pytest.raises(ArgumentError, match="nope.bin not found"):
        build_train_config(parse_args(argv), 1)


def test_bad_flags_fail_before_launching(synthetic_prefix: str) -> None:
    """The script exits with the message and status 2, without a traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pretrain_cola.py"),
            *synthetic_args(synthetic_prefix, "--train-iters", "2", "--global-batch-size", "6"),
        ],
        env=dist_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "not divisible by --micro-batch-size 4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_tokens_gives_iters(synthetic_prefix: str) -> None:
    args = build_train_config(parse_args(synthetic_args(synthetic_prefix, "--train-tokens", "10000")), 2)
    assert args.train_iters == math.ceil(10000 / (16 * 64))


def test_lr_schedule_shape() -> None:
    lrs = [lr_at(i, 1.0, 0.1, 10, 100, "cosine") for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lr_at(55, 1.0, 0.1, 10, 100, "cosine") == pytest.approx(0.55)
    assert lr_at(55, 1.0, 0.0, 10, 100, "linear") == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_zero_stages_agree_with_stage_0(synthetic_prefix: str, tmp_path) -> None:
    """fp32: the first-step loss is identical for ZeRO 0-3 and the next steps agree to fp32 tolerance."""
    losses = {}
    for stage in (0, 1, 2, 3):
        tb = tmp_path / f"z{stage}"
        run_torchrun(
            synthetic_args(
                synthetic_prefix,
                "--train-iters",
                "3",
                "--zero-stage",
                str(stage),
                "--tensorboard-dir",
                str(tb),
            )
        )
        losses[stage] = train_losses(tb)
    for stage in (1, 2, 3):
        assert losses[stage][1] == losses[0][1]
        for it in (2, 3):
            assert losses[stage][it] == pytest.approx(losses[0][it], rel=1e-5), (stage, it)


@pytest.mark.slow
def test_bf16_zero3_matches_stage_0(synthetic_prefix: str, tmp_path) -> None:
    losses = {}
    for stage in (0, 3):
        tb = tmp_path / f"z{stage}"
        run_torchrun(
            synthetic_args(
                synthetic_prefix,
                "--train-iters",
                "2",
                "--zero-stage",
                str(stage),
                "--bf16",
                "--tensorboard-dir",
                str(tb),
            )
        )
        losses[stage] = train_losses(tb)
    for it in (1, 2):
        assert losses[3][it] == pytest.approx(losses[0][it], abs=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("zero, recompute", [("1", "none"), ("3", "cola-m")])
def test_exact_resume(synthetic_prefix: str, tmp_path, zero: str, recompute: str) -> None:
    common = synthetic_args(
        synthetic_prefix, "--train-iters", "6", "--zero-stage", zero, "--recompute", recompute
    )
    run_torchrun([*common, "--tensorboard-dir", str(tmp_path / "straight")])
    ckpt = tmp_path / "ckpt"
    first = run_torchrun(
        [*common, "--tensorboard-dir", str(tmp_path / "split"), "--save", str(ckpt), "--exit-interval", "3"]
    )
    assert "exiting after iteration 3" in first.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    second = run_torchrun(
        [*common, "--tensorboard-dir", str(tmp_path / "split"), "--save", str(ckpt), "--load", str(ckpt)]
    )
    assert "resumed from" in second.stdout
    straight, split = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 7))
    for it in range(1, 7):
        assert f"{split[it]:.6E}" == f"{straight[it]:.6E}", (it, split[it], straight[it])
    # The checkpoint directory holds DeepSpeed's state, our model file and the config.
    names = os.listdir(ckpt / "iter_0000006")
    assert "model_tp00.pt" in names and any(n.endswith("optim_states.pt") for n in names)
    assert (ckpt / "ds_config.json").exists()


@pytest.mark.slow
def test_resume_refuses_incompatible_flags(synthetic_prefix: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    run_torchrun([*synthetic_args(synthetic_prefix, "--train-iters", "2"), "--save", str(ckpt)])
    proc = run_torchrun(
        [*synthetic_args(synthetic_prefix, "--train-iters", "4", "--seq-length", "32"), "--load", str(ckpt)],
        check=False,
    )
    assert proc.returncode != 0 and "cannot resume exactly" in proc.stderr
    assert "--seq-length was 64, now 32 (pass --seq-length 64)" in proc.stderr
    # A finished run continues with a larger --train-iters (on the checkpoint's LR schedule, as logged).
    tb = tmp_path / "tb"
    more = [*synthetic_args(synthetic_prefix, "--train-iters", "4"), "--load", str(ckpt), "--save", str(ckpt)]
    extended = run_torchrun([*more, "--tensorboard-dir", str(tb)])
    assert "> lr schedule: from the checkpoint" in extended.stdout
    assert (
        "--train-iters was 2, now 4: iterations 3-4 run past the checkpoint's --lr-decay-iters 2"
        in extended.stdout
    )
    assert sorted(train_losses(tb)) == [3, 4] and (ckpt / "latest").read_text().strip() == "iter_0000004"


def test_incomplete_checkpoint_is_ignored(tmp_path) -> None:
    """A directory without ``latest`` (a save killed midway) is not a checkpoint to resume from."""
    from megatron_cola.checkpoint import read_latest

    (tmp_path / "iter_0000005").mkdir()
    (tmp_path / "iter_0000005" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert read_latest(str(tmp_path)) is None


@pytest.mark.slow
def test_loss_goes_down_on_sample_corpus(sample_corpus: dict[str, str], tmp_path) -> None:
    tb = tmp_path / "tb"
    proc = run_torchrun(
        [
            "--model-size",
            "debug",
            "--num-layers",
            "2",
            "--data-path",
            sample_corpus["prefix"],
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            sample_corpus["tokenizer"],
            "--seq-length",
            "128",
            "--micro-batch-size",
            "4",
            "--global-batch-size",
            "16",
            "--train-iters",
            "40",
            "--lr",
            "3e-3",
            "--lr-warmup-iters",
            "5",
            "--bf16",
            "--zero-stage",
            "1",
            "--log-interval",
            "10",
            "--eval-interval",
            "20",
            "--eval-iters",
            "2",
            "--split",
            "95,4,1",
            "--tensorboard-dir",
            str(tb),
        ]
    )
    losses = train_losses(tb)
    first = sum(losses[i] for i in range(1, 4)) / 3
    last = sum(losses[i] for i in range(38, 41)) / 3
    assert last < first - 1.5, (first, last)
    assert "validation loss at iteration 40" in proc.stdout and "test loss" in proc.stdout
    assert "| lm loss: " in proc.stdout and "tokens per second" in proc.stdout


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_example_ds_configs_are_accepted(synthetic_prefix: str, stage: int) -> None:
    path = ROOT / "examples" / f"ds_config_zero{stage}.json"
    args = args_for(synthetic_prefix, "--deepspeed_config", str(path))
    cfg = build_ds_config(args)
    assert args.zero_stage == stage and args.bf16 and args.clip_grad == 0.5
    assert cfg["zero_optimization"]["stage"] == stage and cfg["train_batch_size"] == 16
    with pytest.raises(ArgumentError, match="--clip-grad 1.0 contradicts gradient_clipping=0.5"):
        args_for(synthetic_prefix, "--deepspeed_config", str(path), "--clip-grad", "1.0")


def test_vocab_size_only_for_null_tokenizer(synthetic_prefix: str, tmp_path) -> None:
    model = tmp_path / "tok.model"
    model.write_bytes(b"not a sentencepiece model")
    argv = synthetic_args(synthetic_prefix, "--train-iters", "2")
    argv[argv.index("NullTokenizer")] = "SentencePieceTokenizer"
    with pytest.raises(ArgumentError, match="--vocab-size is only for --tokenizer-type NullTokenizer"):
        build_train_config(parse_args([*argv, "--tokenizer-model", str(model)]), 1)
    argv.remove("--vocab-size")
    argv.remove("256")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_cola.py"), *argv, "--tokenizer-model", str(model)],
        env=dist_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "cannot load --tokenizer-model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_from_another_tokenizer_is_refused(synthetic_prefix: str) -> None:
    argv = synthetic_args(synthetic_prefix, "--train-iters", "2")
    argv[argv.index("--vocab-size") + 1] = "100"  # the synthetic data holds ids up to 249
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_cola.py"), *argv],
        env=dist_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "outside the tokenizer's vocabulary [0, 101)" in proc.stderr
    assert "syn_text_document" in proc.stderr  # names the dataset
