"""Extending or re-planning a run on resume (Megatron's rule): the checkpoint's LR schedule is kept unless
``--override-opt-param-scheduler``; ``--train-iters`` only sets the loop's length; the flags that must
still match say what to pass. The schedule is set after the engine has loaded its state, so the first
resumed step runs at the schedule's learning rate also with ``--no-load-optim``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cola.errors import CheckpointError, ConfigError
from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
from megatron_cola.training.checkpointing import check_compatible, recorded_flags, resumed_schedule
from megatron_cola.training.schedule import LRSchedule, Schedule, lr_at

from .conftest import ROOT, dist_env, synthetic_args


@pytest.fixture
def cfg_of(synthetic_prefix: str):
    """``TrainConfig`` of the tiny synthetic run with ``flags`` added."""
    return lambda *flags: build_train_config(
        parse_args(synthetic_args(synthetic_prefix, *flags)), world_size=1
    )


def _client_state(cfg, iteration: int = 4) -> dict:
    return {
        "iteration": iteration,
        "consumed_samples": 16 * iteration,
        "args": recorded_flags(cfg),
        "model_args": model_args_from(cfg, 256).to_dict(),
    }


def test_checkpoint_schedule_is_kept_and_an_extension_is_explained(cfg_of, capsys) -> None:
    saved = cfg_of("--train-iters", "250")
    extended = cfg_of("--train-iters", "300", "--lr", "1e-3")
    check_compatible(_client_state(saved), extended, model_args_from(extended, 256))  # not refused
    schedule = resumed_schedule(_client_state(saved, 250), extended, 250)
    assert schedule == Schedule(3e-3, 0.1 * 3e-3, 2, 250, "cosine")
    out = capsys.readouterr().out
    assert "> lr schedule: from the checkpoint (--lr 0.003 --min-lr 0.0003 --lr-warmup-iters 2 " in out
    assert "--lr-decay-iters 250 --lr-decay-style cosine); iteration 251 runs at lr 0.0003" in out
    assert "not used: --lr 0.001, --min-lr 0.0001, --lr-decay-iters 300" in out
    assert (
        "--train-iters was 250, now 300: iterations 251-300 run past the checkpoint's --lr-decay-iters" in out
    )
    # The explicit form of the default is the same.
    explicit = cfg_of("--train-iters", "300", "--use-checkpoint-opt_param-scheduler")
    assert resumed_schedule(_client_state(saved, 250), explicit, 250) == schedule


def test_override_takes_the_schedule_from_the_flags(cfg_of, capsys) -> None:
    saved = cfg_of("--train-iters", "250")
    replanned = cfg_of("--train-iters", "300", "--lr", "1e-3", "--override-opt-param-scheduler")
    schedule = resumed_schedule(_client_state(saved, 250), replanned, 250)
    assert schedule == Schedule(1e-3, 0.1 * 1e-3, 2, 300, "cosine")
    out = capsys.readouterr().out
    assert "> lr schedule: from the flags (--override-opt-param-scheduler) (--lr 0.001 " in out
    assert f"iteration 251 runs at lr {lr_at(250, 1e-3, 1e-4, 2, 300):.6g}" in out
    assert "not used" not in out and "run past" not in out


def test_checkpoint_predating_a_schedule_value_uses_the_flags_one(cfg_of) -> None:
    saved = _client_state(cfg_of("--train-iters", "8"))
    del saved["args"]["lr_decay_style"]
    schedule = resumed_schedule(saved, cfg_of("--train-iters", "8", "--lr-decay-style", "linear"), 4)
    assert schedule.lr_decay_style == "linear" and schedule.lr_decay_iters == 8


def test_both_scheduler_flags_are_a_config_error(cfg_of) -> None:
    with pytest.raises(ConfigError, match="contradict each other"):
        cfg_of("--train-iters", "4", "--override-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler")


def test_changed_global_batch_size_is_refused_naming_what_to_pass(cfg_of) -> None:
    saved = cfg_of("--train-iters", "4")
    changed = cfg_of("--train-iters", "4", "--global-batch-size", "32", "--seed", "7")
    with pytest.raises(CheckpointError) as err:
        check_compatible(_client_state(saved), changed, model_args_from(changed, 256))
    msg = str(err.value)
    assert msg.startswith("cannot resume exactly from this checkpoint: --global-batch-size was 16, now 32")
    assert "(pass --global-batch-size 16;" in msg and "--finetune starts a fresh schedule" in msg
    assert "--seed was 1234, now 7 (pass --seed 1234)" in msg


def _optimizer() -> torch.optim.Optimizer:
    """Two parameter groups, like the run's (decayed and not)."""
    return torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}]
    )


def test_lr_schedule_state_round_trip_and_old_lambda_lr_state() -> None:
    schedule = Schedule(1.0, 0.1, 2, 10, "cosine")
    opt = _optimizer()
    sched = LRSchedule(opt, schedule)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert "schedule" not in state and state["last_epoch"] == 4
    fresh = LRSchedule(_optimizer(), schedule)
    fresh.load_state_dict(state)
    assert fresh.last_epoch == 4 and fresh.get_last_lr() == [schedule.lr_at(4)] * 2
    # A checkpoint written with the LambdaLR this scheduler replaced.
    opt = _optimizer()
    old = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: schedule.lr_at(it) / schedule.lr)
    for _ in range(3):
        opt.step()
        old.step()
    opt2 = _optimizer()
    resumed = LRSchedule(opt2, schedule)
    resumed.load_state_dict(old.state_dict())
    resumed.set_schedule(schedule)
    assert resumed.last_epoch == 3
    assert [g["lr"] for g in opt2.param_groups] == [schedule.lr_at(3)] * 2
    opt2.step()
    resumed.step()
    assert [g["lr"] for g in opt2.param_groups] == [schedule.lr_at(4)] * 2


_ENGINE_RESUME = """
import sys, torch
from megatron_cola.checkpoint import CheckpointReader
from megatron_cola.checkpoint.deepspeed_state import peek_client_state
from megatron_cola.parallel import ParallelState
from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
from megatron_cola.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_cola.training.ds_config import build_ds_config
from megatron_cola.training.engine import build_engine, build_parallel_model
from megatron_cola.training.pretrain import init_distributed

save_dir, flags = sys.argv[1], sys.argv[2:]
cpu = torch.device("cpu")
init_distributed(cpu)
parallel = ParallelState.from_torch_distributed(1)

def engine_for(*extra):
    cfg = build_train_config(parse_args([*flags, *extra]), world_size=1)
    model_args = model_args_from(cfg, 256)
    model = build_parallel_model(1, model_args, parallel, cpu)
    engine, scheduler = build_engine(cfg, model, parallel, cpu, build_ds_config(cfg, "cpu"))
    return cfg, model_args, engine, scheduler

cfg, model_args, engine, scheduler = engine_for("--train-iters", "6", "--save", save_dir)
for _ in range(4):  # the schedule of 4 steps (no training needed for the learning rate)
    scheduler.step()
save_checkpoint(engine, cfg, model_args, parallel, 4, 64, None, 256, {})
for name, extra in [
    ("default", []),
    ("no-load-optim", ["--no-load-optim"]),
    ("override", ["--override-opt-param-scheduler", "--lr", "1e-3", "--lr-warmup-iters", "0"]),
]:
    resave = f"{save_dir}-{name}"
    resume = ["--train-iters", "8", "--load", save_dir, "--save", resave, *extra]
    cfg, model_args, engine, scheduler = engine_for(*resume)
    load_checkpoint(engine, cfg, model_args, CheckpointReader(save_dir))
    lrs = sorted({g["lr"] for g in engine.optimizer.param_groups})
    print(f"RESULT {name} {scheduler.last_epoch} {' '.join(repr(x) for x in lrs)}", flush=True)
    save_checkpoint(engine, cfg, model_args, parallel, 4, 64, None, 256, {})  # records the schedule in effect
    recorded = peek_client_state(CheckpointReader(resave))[0]["args"]
    print(f"RECORDED {name}", recorded["lr"], recorded["lr_decay_iters"], recorded["train_iters"], flush=True)
"""


@pytest.mark.slow
def test_engine_resume_sets_the_schedule_after_loading(synthetic_prefix: str, tmp_path: Path) -> None:
    """The learning rate the first resumed step runs at (read from the optimizer DeepSpeed steps) is the
    schedule's: the checkpoint's by default and with ``--no-load-optim`` (before the fix, that one ran at
    step 0's warm-up learning rate), the flags' with ``--override-opt-param-scheduler``; ``--train-iters``
    6 -> 8 is not refused; the next checkpoint records the schedule in effect."""
    proc = subprocess.run(
        [sys.executable, "-c", _ENGINE_RESUME, str(tmp_path / "ckpt"), *synthetic_args(synthetic_prefix)],
        env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {
        line.split()[1]: (int(line.split()[2]), [float(x) for x in line.split()[3:]])
        for line in proc.stdout.splitlines()
        if line.startswith("RESULT ")
    }
    kept = lr_at(4, 3e-3, 3e-4, 2, 6)  # the checkpoint's schedule: warm-up 2, decay over its 6 iterations
    assert results["default"] == (4, [pytest.approx(kept)])
    assert results["no-load-optim"] == (4, [pytest.approx(kept)])
    assert results["override"] == (4, [pytest.approx(lr_at(4, 1e-3, 1e-4, 0, 8))])
    # The next checkpoint records the schedule in effect (and the new loop length).
    recorded = {
        line.split()[1]: line.split()[2:] for line in proc.stdout.splitlines() if line.startswith("RECORDED ")
    }
    assert recorded == {
        "default": ["0.003", "6", "8"],
        "no-load-optim": ["0.003", "6", "8"],
        "override": ["0.001", "8", "8"],
    }
    assert "> lr schedule: from the checkpoint (--lr 0.003 --min-lr 0.0003 --lr-warmup-iters 2" in proc.stdout
    assert "--train-iters was 6, now 8: iterations 7-8 run past" in proc.stdout
