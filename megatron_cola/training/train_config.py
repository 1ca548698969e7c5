"""``TrainConfig``: the typed, frozen configuration of one pre-training run, and the one place flags are
declared.

Each section (``model``, ``training``, ``parallelism``, ``optimizer``, ``schedule``, ``data``,
``checkpoint``, ``evaluation``, ``logging``, ``guards``, ``performance``; torchtitan's ``JobConfig``
shape) is a frozen dataclass whose fields are ``pretrain_cola.py``'s flags: ``flag(default, help, ...)``
carries the Megatron flag name, default, help and choices, and ``arguments.build_parser`` generates the
argparse parser from these fields. Adding a flag means adding one field here (and its cross-flag check,
if any, in ``arguments.build_train_config``).

Everything below the entry point reads a ``TrainConfig`` by section (``cfg.optimizer.lr``) or flat
(``cfg.lr``: the flag's ``dest`` name); ``to_dict()`` is flat, as checkpoints record it. The ``derived``
section is filled in by ``build_train_config`` (world size, data-parallel size, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from megatron_cola.config import COMPILE_MODES, DEFAULT_TP_SCHEME, RECOMPUTE_CHOICES, SIZES, TP_SCHEMES
from megatron_cola.data.tokenizers import TOKENIZER_TYPES

#: ZeRO stage and gradient clip when neither a flag nor ``--deepspeed_config`` sets them.
DEFAULT_ZERO_STAGE = 1
DEFAULT_CLIP_GRAD = 0.5


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line (argparse ``add_argument`` keywords)."""

    names: tuple[str, ...] = ()
    """Option strings; default: ``--`` + the field name with ``-`` for ``_``."""
    type: Any = None
    choices: Any = None
    action: Any = None
    nargs: Any = None
    metavar: str | None = None


def flag(
    default: Any,
    help: str | None = None,  # noqa: A002  (argparse's name)
    *,
    names: tuple[str, ...] = (),
    type: Any = None,  # noqa: A002
    choices: Any = None,
    action: Any = None,
    nargs: Any = None,
    metavar: str | None = None,
) -> Any:
    """A config field that is also a flag: its default, help and argparse details in one place."""
    spec = Flag(names, type, choices, action, nargs, metavar)
    return dataclasses.field(default=default, metadata={"flag": spec, "help": help})


def flag_kwargs(field: dataclasses.Field) -> tuple[list[str], dict[str, Any]]:
    spec: Flag = field.metadata["flag"]
    names = list(spec.names) or [f"--{field.name.replace('_', '-')}"]
    kw: dict[str, Any] = {"dest": field.name, "default": field.default}
    if field.metadata["help"] is not None:
        kw["help"] = field.metadata["help"]
    if spec.action is not None:
        kw["action"] = spec.action
    elif isinstance(field.default, bool):
        kw["action"] = "store_true"
    elif (kind := spec.type if spec.type is not None else _scalar_type(field)) is not None:
        kw["type"] = kind
    for key in ("choices", "nargs", "metavar"):
        if getattr(spec, key) is not None:
            kw[key] = getattr(spec, key)
    return names, kw


def _scalar_type(field: dataclasses.Field) -> Any:
    """``int``/``float`` from the default; strings (and ``None`` defaults without ``type=``) stay str."""
    if field.default is None or isinstance(field.default, str):
        return None
    return type(field.default)


# ------------------------------------------------------------------------------------------ sections
@dataclass(frozen=True)
class ModelConfig:
    """The model's size and shape (``ModelArgs.from_size`` and its overrides)."""

    model_size: str = flag("debug", f"named size, one of {list(SIZES)}")
    full_rank: bool = flag(False, "train the full-rank LLaMA baseline")
    cola_rank: int | None = flag(None, "override the size's CoLA rank", type=int)
    hidden_size: int | None = flag(None, "override the size's hidden size", type=int)
    ffn_hidden_size: int | None = flag(None, "override the size's ffn size", type=int)
    num_layers: int | None = flag(None, "override the size's number of layers", type=int)
    num_attention_heads: int | None = flag(None, "override the size's heads", type=int)
    seq_length: int = flag(256, "tokens per training sample")
    recompute: str = flag(
        "none",
        "activation recomputation: none, full (whole block) or cola-m (keep rank-r activations)",
        choices=RECOMPUTE_CHOICES,
    )
    make_vocab_size_divisible_by: int = flag(
        128, "pad the tokenizer's vocab to a multiple of this (times the TP size) for the embedding/head"
    )


#: ``ModelConfig`` fields that override the named size's shapes (``ModelArgs.from_size``'s overrides).
SHAPE_OVERRIDES = ("cola_rank", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads")


@dataclass(frozen=True)
class TrainingConfig:
    """Batch sizes, length of the run, precision and device."""

    micro_batch_size: int = flag(4, "sequences per forward per data-parallel rank")
    global_batch_size: int | None = flag(None, "sequences per optimizer step", type=int)
    train_iters: int | None = flag(None, "optimizer steps", type=int)
    train_tokens: int | None = flag(None, "alternative to --train-iters", type=int)
    exit_interval: int | None = flag(None, "save and exit after this many iterations", type=int)
    seed: int = flag(1234, "seed of the weights and data order")
    bf16: bool = flag(False, "bf16 weights/activations, fp32 master weights")
    device: str = flag("auto", "where to train", choices=["auto", "cpu", "cuda"])


@dataclass(frozen=True)
class ParallelismConfig:
    """Tensor parallelism and DeepSpeed (ZeRO)."""

    zero_stage: int | None = flag(
        None, f"DeepSpeed ZeRO stage (default {DEFAULT_ZERO_STAGE})", type=int, choices=[0, 1, 2, 3]
    )
    tensor_model_parallel_size: int = flag(1, "GPUs that split each layer")
    cola_tp_scheme: str = flag(
        DEFAULT_TP_SCHEME,
        "how TP splits a CoLA model: split-rank (A and B split over r, replicated residual stream) "
        "or bottleneck (residual stream sharded on d, one r-wide all-reduce per map); full-rank models "
        "use Megatron's dense TP whatever this says",
        choices=TP_SCHEMES,
    )
    deepspeed_config: str | None = flag(
        None,
        "a DeepSpeed JSON config; otherwise one is generated from the flags",
        names=("--deepspeed_config", "--deepspeed-config"),
    )


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and gradient clipping."""

    lr: float = flag(3e-3, "peak learning rate")
    min_lr: float | None = flag(None, "final learning rate (default 0.1 x --lr)", type=float)
    weight_decay: float = flag(0.01)
    adam_beta1: float = flag(0.9)
    adam_beta2: float = flag(0.95)
    adam_eps: float = flag(1e-8)
    clip_grad: float | None = flag(
        None, f"global gradient-norm clip, 0 disables (default {DEFAULT_CLIP_GRAD})", type=float
    )


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule (warmup, then decay to ``--min-lr``)."""

    lr_warmup_iters: int = flag(0, "linear warmup steps")
    lr_decay_iters: int | None = flag(None, "decay steps (default --train-iters)", type=int)
    lr_decay_style: str = flag("cosine", choices=["cosine", "linear", "constant"])


@dataclass(frozen=True)
class DataConfig:
    """Datasets, their split, and the tokenizer."""

    data_path: tuple[str, ...] | None = flag(
        None, "PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... of preprocessed .bin/.idx datasets", nargs="+"
    )
    split: str = flag("969,30,1", "train,valid,test proportions by document")
    data_cache_path: str | None = flag(None, "where index caches go (default: beside the data)")
    tokenizer_type: str = flag("SentencePieceTokenizer", choices=list(TOKENIZER_TYPES))
    tokenizer_model: str | None = flag(None, "SentencePiece .model or HF tokenizer dir/json")
    vocab_size: int | None = flag(None, "vocab of the NullTokenizer", type=int)
    num_workers: int = flag(0, "DataLoader workers")
    allow_data_change: bool = flag(
        False,
        "resume although --data-path or --split differ from the checkpoint's (continued pre-training, "
        "annealing); the change is recorded in the checkpoint's data history",
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go, what a resume loads, and how saves are scheduled (``docs/reliability.md``)."""

    save: str | None = flag(None, "checkpoint directory")
    load: str | None = flag(None, "checkpoint directory to resume from")
    save_interval: int | None = flag(None, "save every N iterations (and at the end)", type=int)
    finetune: bool = flag(False, "load only the weights; start at iteration 0")
    no_load_optim: bool = flag(False, "do not load optimizer states")
    no_load_rng: bool = flag(False, "do not load RNG states")
    no_save_reshardable_optim: bool = flag(
        False,
        "do not write the layout-free optimizer state (optim_tpNN.pt: fp32 master weights and Adam "
        "moments per parameter) with each checkpoint; saves time and disk, but a resume must then use the "
        "same TP size, ZeRO stage and data-parallel size to keep the optimizer state",
    )
    override_opt_param_scheduler: bool = flag(
        False,
        "on resume, take the LR schedule (--lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, "
        "--lr-decay-style) from the flags instead of the checkpoint",
    )
    use_checkpoint_opt_param_scheduler: bool = flag(
        False,
        "on resume, keep the checkpoint's LR schedule (the default; Megatron's explicit form)",
        names=("--use-checkpoint-opt_param-scheduler",),
    )
    async_save: bool = flag(
        False,
        "training pauses only to copy the state into host memory; writing, hashing and 'latest' "
        "happen in the background (at most one save in flight)",
    )
    save_interval_minutes: float | None = flag(
        None,
        "also save when this many minutes passed since the last save (decided at log intervals)",
        type=float,
    )
    keep_last_checkpoints: int | None = flag(
        None, "delete complete checkpoints beyond the newest K (never the one 'latest' names)", type=int
    )


@dataclass(frozen=True)
class EvaluationConfig:
    """Validation during training."""

    eval_interval: int = flag(1000, "validate every N iterations")
    eval_iters: int = flag(10, "validation batches per evaluation")


@dataclass(frozen=True)
class LoggingConfig:
    """Log lines, TensorBoard/metrics.jsonl, MFU, Weights & Biases and the straggler report."""

    log_interval: int = flag(10, "log every N iterations")
    tensorboard_dir: str | None = flag(None, "TensorBoard scalars and metrics.jsonl go here")
    peak_tflops: float | None = flag(
        None,
        "the device's peak TFLOP/s that MFU is measured against (default: the dense bf16 peak of a "
        "known GPU by its exact name; no MFU on CPU or an unknown card)",
        type=float,
    )
    wandb_project: str | None = flag(None, "log the TensorBoard scalars to this W&B project too (rank 0)")
    wandb_exp_name: str | None = flag(None, "W&B run name (default: W&B picks one)")
    wandb_save_dir: str | None = flag(None, "where W&B writes its files (default: SAVE/wandb)")
    log_straggler: bool = flag(
        False, "every log interval, print the slowest and fastest rank's step time (one small gather)"
    )


@dataclass(frozen=True)
class GuardsConfig:
    """Non-finite steps, signals, time limits, timeouts and hangs (``guards.py``, ``watchdog.py``)."""

    check_for_nan_in_loss_and_grad: bool = flag(
        True,
        "skip the optimizer step on every rank when a loss or the grad norm is NaN/Inf (default on)",
        action=argparse.BooleanOptionalAction,
    )
    max_consecutive_skipped_iters: int = flag(
        5, "stop with an error after this many skipped (non-finite) iterations in a row"
    )
    exit_signal_handler: bool = flag(
        True,
        "on SIGTERM/SIGUSR1 every rank saves at the next step boundary and exits 0 (default on)",
        action=argparse.BooleanOptionalAction,
    )
    exit_duration_in_mins: float | None = flag(
        None, "save and exit 0 once the run has been going this many minutes", type=float
    )
    distributed_timeout_minutes: float = flag(
        10.0,
        "timeout of every process group (ours and DeepSpeed's): a collective that waits longer fails",
    )
    hang_timeout_minutes: float | None = flag(
        None,
        "when no step completes for this long, every rank that still runs writes its Python stacks "
        "to SAVE_DIR/hang-<time>/rank<N>.txt and the job exits non-zero naming the ranks that did not "
        "report (default: 10x the slowest recent step, at least 5 minutes; 0 turns the watchdog off)",
        type=float,
    )


@dataclass(frozen=True)
class PerformanceConfig:
    """Execution options: how the model runs, not what it computes (a checkpoint resumes either way)."""

    compile: bool = flag(
        False, "torch.compile each decoder block (after tensor parallelism, before DeepSpeed)"
    )
    compile_mode: str = flag(
        "default",
        "torch.compile mode of --compile: default (Inductor), reduce-overhead (CUDA graphs), "
        "max-autotune, max-autotune-no-cudagraphs (GEMM autotuning without CUDA graphs)",
        choices=COMPILE_MODES,
    )
    grouped_projections: bool = flag(
        False, "run q/k/v and gate/up as one GEMM each (CoLA: their A's; full rank: fused qkv, gate-up)"
    )
    chunked_loss: bool = flag(
        False,
        "LM head + cross entropy a chunk of tokens at a time, without full-vocab logits (TP=1 only)",
    )


@dataclass(frozen=True)
class DerivedConfig:
    """Values ``build_train_config`` computes from the flags and the launcher's environment."""

    world_size: int = 1
    """Processes in the job (from the launcher's environment)."""
    data_parallel_size: int = 1
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step on each data-parallel rank."""
    user_ds_config: Mapping[str, Any] | None = None
    """The parsed ``--deepspeed_config`` file, or ``None`` when the config is generated from the flags."""


@dataclass(frozen=True)
class AcceptedFlags:
    """Flags the parser accepts but the run does not keep: ``--config`` is applied before parsing,
    ``--fp16`` is refused by ``build_train_config``, the other two are Megatron-DeepSpeed's."""

    config: str | None = flag(
        None,
        "a recipe (recipes/<size>.toml): its values become the defaults, flags given here override them",
        metavar="FILE",
    )
    fp16: bool = flag(False, argparse.SUPPRESS)
    deepspeed: bool = flag(False, "accepted for Megatron-DeepSpeed compatibility")
    local_rank: int | None = flag(
        None, "set by the deepspeed launcher", names=("--local_rank", "--local-rank"), type=int
    )


#: The sections of ``TrainConfig`` whose fields are flags, in ``--help`` order, with their titles.
FLAG_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "parallelism": ParallelismConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "evaluation": EvaluationConfig,
    "logging": LoggingConfig,
    "guards": GuardsConfig,
    "performance": PerformanceConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    """One run's configuration. Read a value by section (``cfg.optimizer.lr``) or flat (``cfg.lr``)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = dataclasses.field(default_factory=ParallelismConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    guards: GuardsConfig = dataclasses.field(default_factory=GuardsConfig)
    performance: PerformanceConfig = dataclasses.field(default_factory=PerformanceConfig)
    derived: DerivedConfig = dataclasses.field(default_factory=DerivedConfig)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not sections: the flat view (``cfg.lr``).
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"TrainConfig has no field {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    @classmethod
    def field_names(cls) -> list[str]:
        """Every flat field name (the flags' ``dest`` names, then the derived values)."""
        return list(_SECTION_OF)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from flat ``{field: value}`` (all fields, nothing else)."""
        unknown = set(values) - set(_SECTION_OF)
        if unknown:
            raise TypeError(f"TrainConfig has no field(s) {sorted(unknown)}")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            sections[name] = section_cls(
                **{f.name: values[f.name] for f in dataclasses.fields(section_cls) if f.name in values}
            )
        return cls(**sections)

    def to_dict(self) -> dict[str, Any]:
        """Flat plain values (tuples become lists), e.g. to record in a checkpoint."""
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


_SECTIONS: dict[str, type] = {**FLAG_SECTIONS, "derived": DerivedConfig}
_SECTION_OF: dict[str, str] = {
    f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
}


def flag_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """``(section, field)`` of every flag: the ``TrainConfig`` sections', then ``AcceptedFlags``'."""
    for section, cls in FLAG_SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f
    for f in dataclasses.fields(AcceptedFlags):
        yield "accepted", f


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag of ``flag_fields()`` to ``parser``, one argument group per section."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f in flag_fields():
        if section not in groups:
            title = "other" if section == "accepted" else section
            groups[section] = parser.add_argument_group(title)
        names, kw = flag_kwargs(f)
        groups[section].add_argument(*names, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``pretrain_cola.py``, generated from the fields above."""
    p = argparse.ArgumentParser(
        prog="pretrain_cola.py",
        description="Pre-train a CoLA (or full-rank LLaMA) model with DeepSpeed. Flags follow Megatron-LM.",
        allow_abbrev=False,
    )
    add_flags(p)
    return p


def given_flags(argv: list[str]) -> dict[str, Any]:
    """The values of the flags ``argv`` gives itself (by ``dest``), without defaults or recipe values."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return dict(vars(parser.parse_args(argv)))


def format_flags(values: Mapping[str, Any]) -> str:
    """``{dest: value}`` as the flags that give them (``--num-layers 4 --full-rank``)."""
    words = []
    for dest, value in values.items():
        name = "--" + dest.replace("_", "-")
        if value is True:
            words.append(name)
        elif value is False:
            words.append(f"--no-{name[2:]}" if dest in _BOOLEAN_OPTIONAL else name)
        elif isinstance(value, list | tuple):
            words.append(" ".join([name, *map(str, value)]))
        else:
            words.append(f"{name} {value}")
    return " ".join(words)


_BOOLEAN_OPTIONAL = {
    f.name for _, f in flag_fields() if f.metadata["flag"].action is argparse.BooleanOptionalAction
}
