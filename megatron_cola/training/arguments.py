"""Command-line arguments of ``pretrain_cola.py``, with Megatron-LM's flag names, and their validation.

``build_train_config`` checks everything that can be checked before any
process-group work and returns the frozen ``TrainConfig``; the parsed ``Namespace`` is never modified.
Each message says what to change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from megatron_cola.config import DEFAULT_TP_SCHEME, RECOMPUTE_CHOICES, SIZES, TP_SCHEMES, ModelArgs
from megatron_cola.data.tokenizers import TOKENIZER_TYPES
from megatron_cola.errors import ConfigError
from megatron_cola.model.compile import COMPILE_MODES
from megatron_cola.parallel.sizes import check_tensor_parallel_size
from megatron_cola.training.train_config import TrainConfig


class ArgumentError(ConfigError):
    """A flag is missing, malformed or contradicts another; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_cola.py",
        description="Pre-train a CoLA (or full-rank LLaMA) model with DeepSpeed. Flags follow Megatron-LM.",
        allow_abbrev=False,
    )
    _add_model_flags(p)
    _add_training_flags(p)
    _add_optimizer_flags(p)
    _add_data_flags(p)
    _add_checkpoint_and_logging_flags(p)
    _add_run_time_guard_flags(p)
    _add_performance_flags(p)
    _add_wandb_flags(p)
    _add_hang_and_data_safety_flags(p)
    _add_checkpoint_reliability_flags(p)
    return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-size", default="debug", help=f"named size, one of {list(SIZES)}")
    g.add_argument("--full-rank", action="store_true", help="train the full-rank LLaMA baseline")
    g.add_argument("--cola-rank", type=int, default=None, help="override the size's CoLA rank")
    g.add_argument("--hidden-size", type=int, default=None, help="override the size's hidden size")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="override the size's ffn size")
    g.add_argument("--num-layers", type=int, default=None, help="override the size's number of layers")
    g.add_argument("--num-attention-heads", type=int, default=None, help="override the size's heads")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per training sample")
    g.add_argument(
        "--recompute",
        default="none",
        choices=RECOMPUTE_CHOICES,
        help="activation recomputation: none, full (whole block) or cola-m (keep rank-r activations)",
    )
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the tokenizer's vocab to a multiple of this (times the TP size) for the embedding/head",
    )


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--micro-batch-size", type=int, default=4, help="sequences per forward per data-parallel rank"
    )
    g.add_argument("--global-batch-size", type=int, default=None, help="sequences per optimizer step")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps")
    g.add_argument("--train-tokens", type=int, default=None, help="alternative to --train-iters")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit after this many iterations")
    g.add_argument("--seed", type=int, default=1234, help="seed of the weights and data order")
    g.add_argument("--bf16", action="store_true", help="bf16 weights/activations, fp32 master weights")
    g.add_argument("--fp16", action="store_true", help=argparse.SUPPRESS)
    g.add_argument(
        "--zero-stage", type=int, default=None, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default 1)"
    )
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="GPUs that split each layer")
    g.add_argument(
        "--cola-tp-scheme",
        default=DEFAULT_TP_SCHEME,
        choices=TP_SCHEMES,
        help="how TP splits a CoLA model: split-rank (A and B split over r, replicated residual stream) "
        "or bottleneck (residual stream sharded on d, one r-wide all-reduce per map); full-rank models "
        "use Megatron's dense TP whatever this says",
    )
    g.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default=None,
        help="a DeepSpeed JSON config; otherwise one is generated from the flags",
    )
    g.add_argument("--deepspeed", action="store_true", help="accepted for Megatron-DeepSpeed compatibility")
    g.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher",
    )
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default 0.1 x --lr)")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay steps (default --train-iters)")
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument(
        "--clip-grad", type=float, default=None, help="global gradient-norm clip, 0 disables (default 0.5)"
    )


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... of preprocessed .bin/.idx datasets",
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions by document")
    g.add_argument("--data-cache-path", default=None, help="where index caches go (default: beside the data)")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=list(TOKENIZER_TYPES))
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or HF tokenizer dir/json")
    g.add_argument("--vocab-size", type=int, default=None, help="vocab of the NullTokenizer")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")


def _add_run_time_guard_flags(p: argparse.ArgumentParser) -> None:
    """The non-finite step guard, preemption and time limits (``training/guards.py``)."""
    g = p.add_argument_group("run-time guards")
    g.add_argument(
        "--check-for-nan-in-loss-and-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip the optimizer step on every rank when a loss or the grad norm is NaN/Inf (default on)",
    )
    g.add_argument(
        "--max-consecutive-skipped-iters",
        type=int,
        default=5,
        help="stop with an error after this many skipped (non-finite) iterations in a row",
    )
    g.add_argument(
        "--exit-signal-handler",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on SIGTERM/SIGUSR1 every rank saves at the next step boundary and exits 0 (default on)",
    )
    g.add_argument(
        "--exit-duration-in-mins",
        type=float,
        default=None,
        help="save and exit 0 once the run has been going this many minutes",
    )


def _check_run_time_guards(v: dict[str, Any]) -> None:
    if v["max_consecutive_skipped_iters"] < 1:
        raise ArgumentError(
            f"--max-consecutive-skipped-iters must be >= 1, got {v['max_consecutive_skipped_iters']}"
        )
    if v["exit_duration_in_mins"] is not None and v["exit_duration_in_mins"] <= 0:
        raise ArgumentError(f"--exit-duration-in-mins must be > 0, got {v['exit_duration_in_mins']}")


def _add_checkpoint_and_logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--finetune", action="store_true", help="load only the weights; start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer states")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    g.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, take the LR schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, "
        "--lr-decay-style) from the flags instead of the checkpoint",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        action="store_true",
        help="on resume, keep the checkpoint's LR schedule (the default; Megatron's explicit form)",
    )
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="log every N iterations")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard scalars and metrics.jsonl go here")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s that MFU is measured against (default: the dense bf16 peak of a "
        "known GPU by its exact name; no MFU on CPU or an unknown card)",
    )


# ------------------------------------------------------------------ checkpoint reliability (issue 19)
def _add_checkpoint_reliability_flags(p: argparse.ArgumentParser) -> None:
    """Background saves, time-based saves and checkpoint rotation (``docs/reliability.md``)."""
    g = p.add_argument_group("checkpoint saving")
    g.add_argument(
        "--async-save",
        action="store_true",
        help="training pauses only to copy the state into host memory; writing, hashing and 'latest' "
        "happen in the background (at most one save in flight)",
    )
    g.add_argument(
        "--save-interval-minutes",
        type=float,
        default=None,
        help="also save when this many minutes passed since the last save (decided at log intervals)",
    )
    g.add_argument(
        "--keep-last-checkpoints",
        type=int,
        default=None,
        help="delete complete checkpoints beyond the newest K (never the one 'latest' names)",
    )


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


# ------------------------------------------------------------------ performance
def _add_performance_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("performance (execution options: a checkpoint resumes with or without them)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoder block (after tensor parallelism, before DeepSpeed)",
    )
    g.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode of --compile: default (Inductor), reduce-overhead (CUDA graphs), "
        "max-autotune, max-autotune-no-cudagraphs (GEMM autotuning without CUDA graphs)",
    )
    g.add_argument(
        "--grouped-projections",
        action="store_true",
        help="run q/k/v and gate/up as one GEMM each (CoLA: their A's; full rank: fused qkv, gate-up)",
    )
    g.add_argument(
        "--chunked-loss",
        action="store_true",
        help="LM head + cross entropy a chunk of tokens at a time, without full-vocab logits (TP=1 only)",
    )


def _check_performance_flags(v: dict[str, Any]) -> None:
    if v["compile_mode"] != "default" and not v["compile"]:
        raise ArgumentError(f"--compile-mode {v['compile_mode']} needs --compile; add --compile")
    if v["chunked_loss"] and v["tensor_model_parallel_size"] > 1:
        raise ArgumentError(
            "--chunked-loss works on one tensor-parallel rank only (under TP the loss is vocab-parallel "
            "already); drop --chunked-loss or use --tensor-model-parallel-size 1"
        )


# ------------------------------------------------------------------ Weights & Biases (issue 21)
def _add_wandb_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Weights & Biases (optional: needs the wandb package; WANDB_MODE=offline works)")
    g.add_argument(
        "--wandb-project",
        default=None,
        help="log the TensorBoard scalars to this W&B project too (rank 0)",
    )
    g.add_argument("--wandb-exp-name", default=None, help="W&B run name (default: W&B picks one)")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B writes its files (default: SAVE/wandb)")


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


# ------------------------------------------------------------------ hangs, stragglers, data safety
def _add_hang_and_data_safety_flags(p: argparse.ArgumentParser) -> None:
    """Process-group timeouts, the hang watchdog, the straggler report (``training/watchdog.py``) and the
    data-change check on resume (``training/checkpointing.py``)."""
    g = p.add_argument_group("hangs, stragglers and data safety")
    g.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=10.0,
        help="timeout of every process group (ours and DeepSpeed's): a collective that waits longer fails",
    )
    g.add_argument(
        "--hang-timeout-minutes",
        type=float,
        default=None,
        help="when no step completes for this long, every rank that still runs writes its Python stacks "
        "to SAVE_DIR/hang-<time>/rank<N>.txt and the job exits non-zero naming the ranks that did not "
        "report (default: 10x the slowest recent step, at least 5 minutes; 0 turns the watchdog off)",
    )
    g.add_argument(
        "--log-straggler",
        action="store_true",
        help="every log interval, print the slowest and fastest rank's step time (one small gather)",
    )
    g.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume although --data-path or --split differ from the checkpoint's (continued pre-training, "
        "annealing); the change is recorded in the checkpoint's data history",
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
    return build_parser().parse_args(argv)


_MODEL_OVERRIDES = ("cola_rank", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads")


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
    overrides.update({f: v[f] for f in _MODEL_OVERRIDES if v[f] is not None})
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
        raise ArgumentError("--fp16 is not supported (DeepSpeed refuses it on CPU); use --bf16")
    if v["model_size"] not in SIZES and v["model_size"].lower() not in {k.lower() for k in SIZES}:
        raise ArgumentError(f"unknown --model-size {v['model_size']!r}; allowed: {list(SIZES)}")
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
    return TrainConfig(**v)


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
    prefixes = data_path
    if len(data_path) > 1 or _is_number(data_path[0]):
        if len(data_path) % 2:
            raise ArgumentError(
                "--data-path with weights must alternate WEIGHT PREFIX pairs, got an odd number of items"
            )
        weights, prefixes = data_path[0::2], data_path[1::2]
        for w in weights:
            if not _is_number(w) or float(w) <= 0:
                raise ArgumentError(f"--data-path weight {w!r} must be a positive number")
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ArgumentError(
                    f"--data-path prefix {prefix!r}: {prefix + ext} not found "
                    "(give the prefix without extension, e.g. data/sample/sample_text_document)"
                )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _reconcile_deepspeed_config(v: dict[str, Any]) -> None:
    """A user DeepSpeed config may set batch sizes, precision and ZeRO; flags that contradict it fail."""
    v["user_ds_config"] = None
    path = v["deepspeed_config"]
    if path is None:
        if v["zero_stage"] is None:
            v["zero_stage"] = 1
        if v["clip_grad"] is None:
            v["clip_grad"] = 0.5
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
        float(clip) if clip is not None else (v["clip_grad"] if v["clip_grad"] is not None else 0.5)
    )
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage is not None and v["zero_stage"] is not None and int(stage) != v["zero_stage"]:
        raise ArgumentError(
            f"--zero-stage {v['zero_stage']} contradicts zero_optimization.stage={stage} in {path}; "
            "drop one of them"
        )
    v["zero_stage"] = (
        int(stage) if stage is not None else (v["zero_stage"] if v["zero_stage"] is not None else 1)
    )
    if cfg.get("fp16", {}).get("enabled", False):
        raise ArgumentError(f"{path} enables fp16, which is not supported; use bf16")
    if cfg.get("bf16", {}).get("enabled", False):
        v["bf16"] = True
    elif v["bf16"] and "bf16" in cfg:
        raise ArgumentError(f"--bf16 contradicts bf16.enabled=false in {path}")
    v["user_ds_config"] = cfg
