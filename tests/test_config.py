"""One source of configuration: the parser generated from ``TrainConfig``'s fields, recipes
(``recipes/*.toml``, ``--config``) and flag overrides, the launchers' resolver (``megatron_cola/launch.py``)
and the start-up messages (arguments block, CPU memory warning, errors printed last)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cola import launch
from megatron_cola.config import ModelArgs
from megatron_cola.errors import ConfigError
from megatron_cola.training.arguments import ArgumentError, build_parser, build_train_config, parse_args
from megatron_cola.training.checkpointing import _RECORDED_FLAGS
from megatron_cola.training.pretrain import format_arguments, machine_warnings
from megatron_cola.training.recipe import RECIPE_DIR, recipe_defaults
from megatron_cola.training.train_config import (
    FLAG_SECTIONS,
    TrainConfig,
    format_flags,
    given_flags,
)

from .conftest import ROOT, dist_env, free_port, synthetic_args

RECIPES = sorted(RECIPE_DIR.glob("*.toml"))


# ------------------------------------------------------------------------------------------ the parser
def test_each_field_is_one_flag_with_its_default_and_help() -> None:
    actions = {a.dest: a for a in build_parser()._actions}
    for cls in FLAG_SECTIONS.values():
        for f in dataclasses.fields(cls):
            action = actions[f.name]
            assert action.default == f.default, f.name
            assert action.help == f.metadata["help"], f.name


def test_sections_and_flat_view_agree(synthetic_prefix: str) -> None:
    cfg = build_train_config(
        parse_args(synthetic_args(synthetic_prefix, "--train-iters", "4", "--lr", "1e-3")), 2
    )
    assert cfg.lr == cfg.optimizer.lr == 1e-3 and cfg.train_iters == cfg.training.train_iters == 4
    assert cfg.data_parallel_size == cfg.derived.data_parallel_size == 2
    flat = cfg.to_dict()
    assert list(flat) == TrainConfig.field_names() and set(_RECORDED_FLAGS) <= set(flat)
    again = TrainConfig.from_flat({**flat, "data_path": tuple(flat["data_path"])})
    assert again == cfg
    with pytest.raises(AttributeError):
        cfg.no_such_flag  # noqa: B018
    for dead in ("fp16", "deepspeed", "local_rank", "config"):
        assert dead not in flat  # accepted by the parser, not kept


def test_fp16_says_what_to_use(synthetic_prefix: str) -> None:
    with pytest.raises(ArgumentError, match=r"^fp16 is not supported: use --bf16"):
        build_train_config(parse_args(synthetic_args(synthetic_prefix, "--train-iters", "2", "--fp16")), 1)


def test_given_flags_round_trip_through_format_flags() -> None:
    argv = [
        "--num-layers",
        "4",
        "--full-rank",
        "--no-exit-signal-handler",
        "--data-path",
        "0.5",
        "a",
        "0.5",
        "b",
    ]
    given = given_flags(argv)
    assert given == {
        "num_layers": 4,
        "full_rank": True,
        "exit_signal_handler": False,
        "data_path": ["0.5", "a", "0.5", "b"],
    }
    assert given_flags(format_flags(given).split()) == given


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_load_and_flags_override_them(recipe: Path) -> None:
    values = recipe_defaults(recipe)
    args = parse_args(["--config", str(recipe), "--train-iters", "7"])
    assert args.train_iters == 7  # a flag wins
    for key, value in values.items():
        if key != "train_iters":
            assert getattr(args, key) == value, key
    assert args.model_size.lower() == recipe.stem.lower() and args.global_batch_size is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[optimizer]\nlearning_rate = 1e-3\n", r"\[optimizer\] learning_rate: unknown key"),
        ("[model]\nlr = 1e-3\n", r"\[model\] lr: unknown key; it belongs in \[optimizer\]"),
        ("[optimiser]\nlr = 1e-3\n", r"unknown table \[optimiser\]"),
        ("lr = 1e-3\n", r"unknown table \[lr\]"),
        ("[training]\ntrain_iters = 1.5\n", r"train_iters = 1.5: expected a int"),
        ("[model]\nrecompute = 'some'\n", r"recompute = 'some': allowed"),
        ("[launcher]\nnodes = 2\n", r"\[launcher\] nodes: unknown key"),
        ("[model\n", r"is not valid TOML"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, text: str, message: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(bad)])


def test_deepspeed_config_owns_zero_stage_and_clipping() -> None:
    ds = str(ROOT / "examples" / "ds_config_zero3.json")
    args = parse_args(["--config", str(RECIPE_DIR / "7b.toml"), "--deepspeed_config", ds])
    assert args.zero_stage is None and args.clip_grad is None and args.recompute == "cola-m"


# ------------------------------------------------------------------------------------------ launch.py
ENV = {"DATA_PATH": "/d/a", "TOKENIZER_MODEL": "/d/t"}


def test_save_dir_is_under_the_checkout_and_distinct_per_shape_override() -> None:
    plain = launch.resolve("60m", [], ENV)
    assert plain.save_dir == str(launch.REPO_DIR / "checkpoints" / "cola_60M")
    small = launch.resolve("60m", ["--num-layers", "4"], ENV)
    assert small.save_dir.startswith(plain.save_dir + "_") and small.save_dir != plain.save_dir
    assert launch.resolve("60m", ["--num-layers", "4", "--lr", "1e-3"], ENV).save_dir == small.save_dir
    assert launch.resolve("60m", ["--num-layers", "2"], ENV).save_dir not in (plain.save_dir, small.save_dir)
    assert launch.resolve("60m", [], {**ENV, "FULL_RANK": "1"}).save_dir.endswith("full_60M")
    assert launch.resolve("60m", ["--full-rank"], ENV).save_dir.endswith("full_60M")
    assert launch.resolve("60m", [], {**ENV, "SAVE_DIR": "/x"}).save_dir == "/x"
    assert launch.resolve("60m", ["--save", "/y"], {**ENV, "SAVE_DIR": "/x"}).save_dir == "/y"  # last wins


def test_gpus_per_node_is_detected(monkeypatch) -> None:
    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert launch.resolve("7b", [], ENV).gpus_per_node == 4
    assert launch.resolve("7b", [], {**ENV, "GPUS_PER_NODE": "8"}).gpus_per_node == 8
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    plan = launch.resolve("7b", [], ENV)
    assert plan.gpus_per_node == launch.CPU_RANKS and "no GPU found" in plan.notes[0]


def test_environment_knobs_become_flags() -> None:
    env = {**ENV, "TP": "2", "ZERO_STAGE": "3", "WARMUP": "5", "FULL_RANK": "1", "EXIT_SIGNAL_HANDLER": "0"}
    args = parse_args(launch.resolve("7b", ["--seed", "3"], env).flags)
    assert (args.tensor_model_parallel_size, args.zero_stage, args.lr_warmup_iters) == (2, 3, 5)
    assert args.full_rank and args.recompute == "full" and not args.exit_signal_handler and args.seed == 3
    assert parse_args(launch.resolve("7b", ["--full-rank"], ENV).flags).recompute == "full"
    with pytest.raises(ConfigError, match="FULL_RANK must be 0 or 1"):
        launch.resolve("7b", [], {**ENV, "FULL_RANK": "yes"})
    with pytest.raises(ConfigError, match="no recipe for size '3b'"):
        launch.resolve("3b", [], ENV)


def test_rank_errors_are_reported_once_with_their_ranks(tmp_path, capsys) -> None:
    for rank in (0, 1):
        (tmp_path / f"rank{rank}.txt").write_text("--min-lr 6.0 is larger than --lr 5.0\n")
    launch.report_rank_errors(str(tmp_path))
    err = capsys.readouterr().err
    assert err.strip() == "pretrain_cola.py (ranks 0, 1): error: --min-lr 6.0 is larger than --lr 5.0"


# ------------------------------------------------------------------------------------------ start-up
def test_arguments_block_says_where_values_came_from(synthetic_prefix: str) -> None:
    argv = [
        "--config",
        str(RECIPE_DIR / "debug.toml"),
        *synthetic_args(synthetic_prefix, "--train-iters", "3"),
    ]
    cfg = build_train_config(parse_args(argv), 1)
    text = format_arguments(cfg, argv)
    lines = text.splitlines()
    assert lines[0] == "------------------------ arguments ------------------------"
    assert "  train_iters " + "." * 37 + " 3" in lines
    assert lines[-1].startswith(f"> from the recipe {RECIPE_DIR / 'debug.toml'}; flags change:")
    assert "--train-iters 3 (recipe: 200)" in lines[-1] and "--num-layers 2" in lines[-1]
    plain = format_arguments(cfg, argv[2:]).splitlines()[-1]
    assert plain.startswith("> from the flags (defaults for the rest): --model-size debug")


def test_cpu_memory_warning(synthetic_prefix: str) -> None:
    cfg = build_train_config(parse_args(synthetic_args(synthetic_prefix, "--train-iters", "2")), 2)
    cpu = torch.device("cpu")
    assert machine_warnings(cfg, ModelArgs.from_size("debug"), cpu) == []
    (warning,) = machine_warnings(cfg, ModelArgs.from_size("7B", full_rank=True), cpu)
    assert "on CPU needs at least" in warning and "GiB of RAM" in warning
    assert machine_warnings(cfg, ModelArgs.from_size("7B"), torch.device("meta")) == []


def test_torchrun_failure_prints_the_ranks_error_last(synthetic_prefix: str, tmp_path) -> None:
    """Under torchrun the one-line error comes after torchrun's ChildFailedError report."""
    env = {
        **dist_env(),
        "PYTHON": sys.executable,
        "LAUNCHER": "torchrun",
        "GPUS_PER_NODE": "1",
        "MASTER_PORT": str(free_port()),
        "DATA_PATH": synthetic_prefix,
        "TOKENIZER_TYPE": "NullTokenizer",
        "TOKENIZER_MODEL": "none",
        "SAVE_DIR": str(tmp_path / "ck"),
    }
    argv = ["--vocab-size", "256", "--lr", "1e-3", "--min-lr", "1e-2"]
    cmd = ["bash", str(ROOT / "examples" / "pretrain_cola_debug.sh"), *argv]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ChildFailedError" in proc.stderr or "FAILED" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == (
        "pretrain_cola.py (rank 0): error: --min-lr 0.01 is larger than --lr 0.001"
    )
    assert not any(name.startswith("megatron-cola-errors-") for name in os.listdir(tmp_path))
