"""Command-line arguments of ``pretrain_cola.py``, with Megatron-LM's flag names, and their validation.

Everything that can be checked before any process-group work is checked in ``validate_args``; each
message says what to change.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from megatron_cola.config import RECOMPUTE_CHOICES, SIZES, ModelArgs
from megatron_cola.errors import ConfigError
from megatron_cola.parallel.transform import pad_vocab_size  # noqa: F401  (re-exported)

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


class ArgumentError(ConfigError):
    """A flag is missing, malformed or contradicts another; the message says what to change."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_cola.py",
        description="Pre-train a CoLA (or full-rank LLaMA) model with DeepSpeed. Flags follow Megatron-LM.",
        allow_abbrev=False,
    )
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

    g = p.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... of preprocessed .bin/.idx datasets",
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions by document")
    g.add_argument("--data-cache-path", default=None, help="where index caches go (default: beside the data)")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model or HF tokenizer dir/json")
    g.add_argument("--vocab-size", type=int, default=None, help="vocab of the NullTokenizer")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")

    g = p.add_argument_group("checkpoints, evaluation, logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--finetune", action="store_true", help="load only the weights; start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer states")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG states")
    g.add_argument("--eval-interval", type=int, default=1000, help="validate every N iterations")
    g.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="log every N iterations")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard scalars and metrics.jsonl go here")
    return p


def world_size_from_env() -> int:
    """The launcher's world size (torchrun/deepspeed, Open MPI, MPICH/Intel MPI, SLURM srun), else 1."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return args


def model_args_from(args: argparse.Namespace, vocab_size: int) -> ModelArgs:
    """``ModelArgs`` of this run (``vocab_size`` already padded)."""
    overrides: dict[str, Any] = {
        "vocab_size": vocab_size,
        "recompute": args.recompute,
        "max_seq_length": args.seq_length,
    }
    for flag, field in (
        ("cola_rank", "cola_rank"),
        ("hidden_size", "hidden_size"),
        ("ffn_hidden_size", "ffn_hidden_size"),
        ("num_layers", "num_layers"),
        ("num_attention_heads", "num_attention_heads"),
    ):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    return ModelArgs.from_size(args.model_size, full_rank=args.full_rank, **overrides)


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> argparse.Namespace:
    """Check flags against each other and fill derived values (``data_parallel_size``,
    ``gradient_accumulation_steps``, ``train_iters``, ``min_lr``, ``zero_stage``...).

    Raises ``ArgumentError``.
    """
    world_size = world_size_from_env() if world_size is None else world_size
    args.world_size = world_size
    if args.fp16:
        raise ArgumentError("--fp16 is not supported (DeepSpeed refuses it on CPU); use --bf16")
    if args.model_size not in SIZES and args.model_size.lower() not in {k.lower() for k in SIZES}:
        raise ArgumentError(f"unknown --model-size {args.model_size!r}; allowed: {list(SIZES)}")
    if args.recompute == "cola-m" and args.full_rank:
        raise ArgumentError("--recompute cola-m needs a CoLA model; drop --full-rank or use --recompute full")
    tp = args.tensor_model_parallel_size
    if tp < 1:
        raise ArgumentError(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if world_size % tp:
        raise ArgumentError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp}; "
            f"launch a multiple of {tp} processes or change the TP size"
        )
    args.data_parallel_size = world_size // tp
    if args.micro_batch_size < 1:
        raise ArgumentError(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}; "
            f"use a multiple of {per_step}"
        )
    args.gradient_accumulation_steps = args.global_batch_size // per_step

    if args.train_iters is not None and args.train_tokens is not None:
        raise ArgumentError("give either --train-iters or --train-tokens, not both")
    if args.train_tokens is not None:
        args.train_iters = math.ceil(args.train_tokens / (args.global_batch_size * args.seq_length))
    if args.train_iters is None or args.train_iters < 1:
        raise ArgumentError("set --train-iters N (N >= 1) or --train-tokens")
    if args.min_lr is None:
        args.min_lr = 0.1 * args.lr
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters > args.lr_decay_iters:
        raise ArgumentError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be between 0 and the decay length "
            f"({args.lr_decay_iters} iterations)"
        )
    for flag in ("log_interval", "eval_interval", "seq_length"):
        if getattr(args, flag) < 1:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.eval_iters < 0:
        raise ArgumentError("--eval-iters must be >= 0")
    if args.save_interval is not None and args.save_interval < 1:
        raise ArgumentError("--save-interval must be >= 1")
    if args.save_interval is not None and not args.save:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ArgumentError("--exit-interval must be >= 1")

    if not args.data_path:
        raise ArgumentError("--data-path is required: a preprocessed prefix (see tools/preprocess_data.py)")
    _check_data_path(args.data_path)
    if args.tokenizer_type == "NullTokenizer":
        if args.vocab_size is None:
            raise ArgumentError("--tokenizer-type NullTokenizer needs --vocab-size")
    elif args.vocab_size is not None:
        raise ArgumentError(
            f"--vocab-size is only for --tokenizer-type NullTokenizer; {args.tokenizer_type} takes its "
            "vocab from --tokenizer-model (the embedding is padded with --make-vocab-size-divisible-by)"
        )
    elif not args.tokenizer_model:
        raise ArgumentError(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model PATH")
    elif not os.path.exists(args.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model {args.tokenizer_model} does not exist")

    _reconcile_deepspeed_config(args)
    if args.finetune and not args.load:
        raise ArgumentError("--finetune needs --load DIR")
    return args


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


def _reconcile_deepspeed_config(args: argparse.Namespace) -> None:
    """A user DeepSpeed config may set batch sizes, precision and ZeRO; flags that contradict it fail."""
    args.user_ds_config = None
    if args.deepspeed_config is None:
        if args.zero_stage is None:
            args.zero_stage = 1
        if args.clip_grad is None:
            args.clip_grad = 0.5
        return
    try:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise ArgumentError(f"--deepspeed_config {args.deepspeed_config} does not exist") from e
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--deepspeed_config {args.deepspeed_config} is not valid JSON: {e}") from e
    checks = {
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
    }
    for key, value in checks.items():
        if key in cfg and cfg[key] != "auto" and int(cfg[key]) != value:
            raise ArgumentError(
                f"{args.deepspeed_config}: {key}={cfg[key]} contradicts the flags ({key} would be {value}); "
                "make them agree or remove the key from the config"
            )
    clip = cfg.get("gradient_clipping")
    if clip is not None and args.clip_grad is not None and float(clip) != args.clip_grad:
        raise ArgumentError(
            f"--clip-grad {args.clip_grad} contradicts gradient_clipping={clip} in {args.deepspeed_config}; "
            "drop one of them"
        )
    args.clip_grad = (
        float(clip) if clip is not None else (args.clip_grad if args.clip_grad is not None else 0.5)
    )
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage is not None and args.zero_stage is not None and int(stage) != args.zero_stage:
        raise ArgumentError(
            f"--zero-stage {args.zero_stage} contradicts zero_optimization.stage={stage} in "
            f"{args.deepspeed_config}; drop one of them"
        )
    args.zero_stage = (
        int(stage) if stage is not None else (args.zero_stage if args.zero_stage is not None else 1)
    )
    cfg_bf16 = cfg.get("bf16", {}).get("enabled", False)
    if cfg.get("fp16", {}).get("enabled", False):
        raise ArgumentError(f"{args.deepspeed_config} enables fp16, which is not supported; use bf16")
    if cfg_bf16:
        args.bf16 = True
    elif args.bf16 and "bf16" in cfg:
        raise ArgumentError(f"--bf16 contradicts bf16.enabled=false in {args.deepspeed_config}")
    args.user_ds_config = cfg
