"""Command-line arguments of ``pretrain_cola.py`` (Megatron-LM's flag names) and their validation.

The flags themselves (names, defaults, help, choices) are ``TrainConfig``'s fields in ``train_config.py``;
``build_parser`` generates the parser from them. ``build_train_config`` is the one place flags are
checked against each other, before any process-group work, and returns the frozen ``TrainConfig``; the
parsed ``Namespace`` is never modified. Each message says what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any

from megatron_cola.config import SIZES, ModelArgs, lookup_size
from megatron_cola.data.builder import parse_data_path
from megatron_cola.errors import ConfigError
from megatron_cola.parallel.sizes import check_tensor_parallel_size
from megatron_cola.training.recipe import apply_recipe
from megatron_cola.training.train_config import (
    DEFAULT_CLIP_GRAD,
    DEFAULT_ZERO_STAGE,
    SHAPE_OVERRIDES,
    AcceptedFlags,
    TrainConfig,
    build_parser,
    given_flags,
)

__all__ = [
    "ArgumentError",
    "build_parser",
    "build_train_config",
    "given_flags",
    "model_args_from",
    "parse_args",
]

#: Parsed flags that ``TrainConfig`` does not keep (``AcceptedFlags``).
_NOT_KEPT = tuple(f.name for f in dataclasses.fields(AcceptedFlags))


class ArgumentError(ConfigError):
    """A flag is missing, malformed or contradicts another; the message says what to change."""


def _check_run_time_guards(v: dict[str, Any]) -> None:
    if v["max_consecutive_skipped_iters"] < 1:
        raise ArgumentError(
            f"--max-consecutive-skipped-iters must be >= 1, got {v['max_consecutive_skipped_iters']}"
        )
    if v["exit_duration_in_mins"] is not None and v["exit_duration_in_mins"] <= 0:
        raise ArgumentError(f"--exit-duration-in-mins must be > 0, got {v['exit_duration_in_mins']}")


def _check_checkpoint_reliability_flags(v: dict[str, Any]) -> None:
    for flag in ("async_save", "save_interval_minutes", "keep_last_checkpoints"):
        if v[flag] and not v["save"]:
            raise ArgumentError(f"--{flag.replace('_', '-')} needs --save DIR")
    minutes = v["save_interval_minutes"]
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise ArgumentError(f"--save-interval-minutes must be > 0, got {minutes}")
    keep = v["keep_last_checkpoints"]
    if keep is not None and keep < 1:
        raise ArgumentError(f"--keep-last-checkpoints must be >= 1, got {keep}")


def _check_performance_flags(v: dict[str, Any]) -> None:
    if v["compile_mode"] != "default" and not v["compile"]:
        raise ArgumentError(f"--compile-mode {v['compile_mode']} needs --compile; add --compile")
    if v["chunked_loss"] and v["tensor_model_parallel_size"] > 1:
        raise ArgumentError(
            "--chunked-loss works on one tensor-parallel rank only (under TP the loss is vocab-parallel "
            "already); drop --chunked-loss or use --tensor-model-parallel-size 1"
        )


def _check_wandb(v: dict[str, Any]) -> None:
    if not v["wandb_project"]:
        for flag in ("wandb_exp_name", "wandb_save_dir"):
            if v[flag]:
                raise ArgumentError(
                    f"--{flag.replace('_', '-')} is given without --wandb-project: nothing would be logged "
                    "to Weights & Biases; add --wandb-project NAME"
                )
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ArgumentError(
            "--wandb-project needs the wandb package, which is not importable: pip install wandb "
            "(or drop --wandb-project)"
        )
    if not v["wandb_save_dir"] and not v["save"]:
        raise ArgumentError(
            "--wandb-project needs --wandb-save-dir DIR or --save DIR (files go to SAVE/wandb)"
        )


def _check_hang_and_data_safety_flags(v: dict[str, Any]) -> None:
    t = v["distributed_timeout_minutes"]
    if not math.isfinite(t) or t <= 0:
        raise ArgumentError(f"--distributed-timeout-minutes must be > 0, got {t}")
    h = v["hang_timeout_minutes"]
    if h is not None and (not math.isfinite(h) or h < 0):
        raise ArgumentError(f"--hang-timeout-minutes must be >= 0 (0 turns the watchdog off), got {h}")


def world_size_from_env() -> int:
    """The launcher's world size (torchrun/deepspeed, Open MPI, MPICH/Intel MPI, SLURM srun), else 1."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` the recipe's values are the defaults the flags override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    apply_recipe(parser, argv)
    return parser.parse_args(argv)


def model_args_from(cfg: TrainConfig, vocab_size: int | None) -> ModelArgs:
    """``ModelArgs`` of this run (``vocab_size`` already padded; ``None`` keeps the size's default).

    ``ModelArgs`` owns the model's own checks (e.g. CoLA-M needs a CoLA model); their ``ValueError`` is
    raised as an ``ArgumentError`` naming the model flags.
    """
    return _model_args(cfg.to_dict(), vocab_size)


def _model_args(v: dict[str, Any], vocab_size: int | None) -> ModelArgs:
    overrides: dict[str, Any] = {"recompute": v["recompute"], "max_seq_length": v["seq_length"]}
    overrides.update(grouped_projections=v["grouped_projections"], chunked_loss=v["chunked_loss"])
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    overrides.update({f: v[f] for f in SHAPE_OVERRIDES if v[f] is not None})
    try:
        return ModelArgs.from_size(v["model_size"], full_rank=v["full_rank"], **overrides)
    except ValueError as e:
        raise ArgumentError(
            f"the model flags (--model-size, --full-rank, --recompute and the size overrides) give an "
            f"invalid model: {e}"
        ) from e


def build_train_config(args: argparse.Namespace, world_size: int | None = None) -> TrainConfig:
    """Check the flags against each other and return the run's ``TrainConfig``, with the derived values
    (``data_parallel_size``, ``gradient_accumulation_steps``, ``train_iters``, ``min_lr``, ``zero_stage``,
    ...) filled in. ``args`` is not modified. Raises ``ArgumentError``.
    """
    v: dict[str, Any] = dict(vars(args))
    v["world_size"] = world_size_from_env() if world_size is None else world_size
    if v["fp16"]:
        raise ArgumentError("fp16 is not supported: use --bf16 (bf16 weights, fp32 master weights)")
    for name in _NOT_KEPT:
        v.pop(name, None)
    try:
        lookup_size(v["model_size"])
    except ValueError:
        raise ArgumentError(f"unknown --model-size {v['model_size']!r}; allowed: {list(SIZES)}") from None
    _check_batch_and_parallel(v)
    _check_schedule(v)
    _check_intervals(v)
    _check_run_time_guards(v)
    _check_data_and_tokenizer(v)
    _reconcile_deepspeed_config(v)
    _check_performance_flags(v)
    _check_wandb(v)
    _check_hang_and_data_safety_flags(v)
    _check_checkpoint_reliability_flags(v)
    if v["finetune"] and not v["load"]:
        raise ArgumentError("--finetune needs --load DIR")
    if v["override_opt_param_scheduler"] and v["use_checkpoint_opt_param_scheduler"]:
        raise ArgumentError(
            "--override-opt-param-scheduler (the LR schedule from the flags) and "
            "--use-checkpoint-opt_param-scheduler (the checkpoint's) contradict each other: pass one"
        )
    _model_args(v, None)  # the model's own checks, before any process-group work
    v["data_path"] = tuple(v["data_path"])
    return TrainConfig.from_flat(v)


def _check_batch_and_parallel(v: dict[str, Any]) -> None:
    tp, world_size = v["tensor_model_parallel_size"], v["world_size"]
    check_tensor_parallel_size(tp, world_size=world_size)
    v["data_parallel_size"] = dp = world_size // tp
    mbs = v["micro_batch_size"]
    if mbs < 1:
        raise ArgumentError(f"--micro-batch-size must be >= 1, got {mbs}")
    per_step = mbs * dp
    if v["global_batch_size"] is None:
        v["global_batch_size"] = per_step
    if v["global_batch_size"] % per_step:
        raise ArgumentError(
            f"--global-batch-size {v['global_batch_size']} is not divisible by --micro-batch-size "
            f"{mbs} x data-parallel size {dp} = {per_step}; use a multiple of {per_step}"
        )
    v["gradient_accumulation_steps"] = v["global_batch_size"] // per_step


def _check_schedule(v: dict[str, Any]) -> None:
    if v["train_iters"] is not None and v["train_tokens"] is not None:
        raise ArgumentError("give either --train-iters or --train-tokens, not both")
    if v["train_tokens"] is not None:
        v["train_iters"] = math.ceil(v["train_tokens"] / (v["global_batch_size"] * v["seq_length"]))
    if v["train_iters"] is None or v["train_iters"] < 1:
        raise ArgumentError("set --train-iters N (N >= 1) or --train-tokens")
    _check_optimizer_signs(v)
    if v["min_lr"] is None:
        v["min_lr"] = 0.1 * v["lr"]
    if v["min_lr"] > v["lr"]:
        raise ArgumentError(f"--min-lr {v['min_lr']} is larger than --lr {v['lr']}")
    if v["lr_decay_iters"] is None:
        v["lr_decay_iters"] = v["train_iters"]
    if v["lr_warmup_iters"] < 0 or v["lr_warmup_iters"] > v["lr_decay_iters"]:
        raise ArgumentError(
            f"--lr-warmup-iters {v['lr_warmup_iters']} must be between 0 and the decay length "
            f"({v['lr_decay_iters']} iterations)"
        )


def _check_optimizer_signs(v: dict[str, Any]) -> None:
    """Signs first, so that a negative --lr is reported as such (not as a --min-lr mismatch)."""
    if not (v["lr"] > 0 and math.isfinite(v["lr"])):
        raise ArgumentError(f"--lr must be a positive number, got {v['lr']}")
    checks = [("min_lr", False), ("weight_decay", False), ("clip_grad", False), ("adam_eps", True)]
    for name, strict in checks:
        value = v[name]
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            bound = "> 0" if strict else ">= 0"
            raise ArgumentError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


def _check_intervals(v: dict[str, Any]) -> None:
    for flag in ("log_interval", "eval_interval", "seq_length"):
        if v[flag] < 1:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 1")
    if v["eval_iters"] < 0:
        raise ArgumentError("--eval-iters must be >= 0")
    if v["save_interval"] is not None and v["save_interval"] < 1:
        raise ArgumentError("--save-interval must be >= 1")
    peak = v["peak_tflops"]
    if peak is not None and not (math.isfinite(peak) and peak > 0):
        raise ArgumentError(f"--peak-tflops must be a positive number of TFLOP/s, got {peak}")
    if v["save_interval"] is not None and not v["save"]:
        raise ArgumentError("--save-interval needs --save DIR")
    if v["exit_interval"] is not None and v["exit_interval"] < 1:
        raise ArgumentError("--exit-interval must be >= 1")


def _check_data_and_tokenizer(v: dict[str, Any]) -> None:
    if not v["data_path"]:
        raise ArgumentError("--data-path is required: a preprocessed prefix (see tools/preprocess_data.py)")
    _check_data_path(v["data_path"])
    tokenizer_type = v["tokenizer_type"]
    if tokenizer_type == "NullTokenizer":
        if v["vocab_size"] is None:
            raise ArgumentError("--tokenizer-type NullTokenizer needs --vocab-size")
    elif v["vocab_size"] is not None:
        raise ArgumentError(
            f"--vocab-size is only for --tokenizer-type NullTokenizer; {tokenizer_type} takes its "
            "vocab from --tokenizer-model (the embedding is padded with --make-vocab-size-divisible-by)"
        )
    elif not v["tokenizer_model"]:
        raise ArgumentError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH")
    elif not os.path.exists(v["tokenizer_model"]):
        raise ArgumentError(f"--tokenizer-model {v['tokenizer_model']} does not exist")


def _check_data_path(data_path: list[str]) -> None:
    """The syntax is ``data.builder.parse_data_path``'s (the one parser of ``--data-path``); here only
    whether each prefix's files exist, before any process starts."""
    try:
        prefixes, _ = parse_data_path(data_path)
    except ConfigError as e:
        raise ArgumentError(str(e)) from None
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ArgumentError(
                    f"--data-path prefix {prefix!r}: {prefix + ext} not found "
                    "(give the prefix without extension, e.g. data/sample/sample_text_document)"
                )


def _reconcile_deepspeed_config(v: dict[str, Any]) -> None:
    """A user DeepSpeed config may set batch sizes, precision and ZeRO; flags that contradict it fail."""
    v["user_ds_config"] = None
    path = v["deepspeed_config"]
    if path is None:
        if v["zero_stage"] is None:
            v["zero_stage"] = DEFAULT_ZERO_STAGE
        if v["clip_grad"] is None:
            v["clip_grad"] = DEFAULT_CLIP_GRAD
        return
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise ArgumentError(f"--deepspeed_config {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--deepspeed_config {path} is not valid JSON: {e}") from e
    for key, flag in (
        ("train_batch_size", "global_batch_size"),
        ("train_micro_batch_size_per_gpu", "micro_batch_size"),
        ("gradient_accumulation_steps", "gradient_accumulation_steps"),
    ):
        if key in cfg and cfg[key] != "auto" and int(cfg[key]) != v[flag]:
            raise ArgumentError(
                f"{path}: {key}={cfg[key]} contradicts the flags ({key} would be {v[flag]}); "
                "make them agree or remove the key from the config"
            )
    clip = cfg.get("gradient_clipping")
    if clip is not None and v["clip_grad"] is not None and float(clip) != v["clip_grad"]:
        raise ArgumentError(
            f"--clip-grad {v['clip_grad']} contradicts gradient_clipping={clip} in {path}; drop one of them"
        )
    v["clip_grad"] = (
        float(clip)
        if clip is not None
        else (v["clip_grad"] if v["clip_grad"] is not None else DEFAULT_CLIP_GRAD)
    )
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage is not None and v["zero_stage"] is not None and int(stage) != v["zero_stage"]:
        raise ArgumentError(
            f"--zero-stage {v['zero_stage']} contradicts zero_optimization.stage={stage} in {path}; "
            "drop one of them"
        )
    v["zero_stage"] = (
        int(stage)
        if stage is not None
        else (v["zero_stage"] if v["zero_stage"] is not None else DEFAULT_ZERO_STAGE)
    )
    if cfg.get("fp16", {}).get("enabled", False):
        raise ArgumentError(f"{path} enables fp16, which is not supported; use bf16")
    if cfg.get("bf16", {}).get("enabled", False):
        v["bf16"] = True
    elif v["bf16"] and "bf16" in cfg:
        raise ArgumentError(f"--bf16 contradicts bf16.enabled=false in {path}")
    v["user_ds_config"] = cfg
