"""``TrainConfig``: the typed, frozen configuration of one pre-training run.

Built and validated once from the flags by ``arguments.build_train_config``; everything below the entry
point (Trainer, checkpointing, DeepSpeed config, data setup) reads this object, never an
``argparse.Namespace``. Field names are the flags' ``dest`` names (``--micro-batch-size`` ->
``micro_batch_size``); the last four fields are derived during validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    # model
    model_size: str
    """Named size (``debug``, ``60M``, ...; see ``megatron_cola.config.SIZES``)."""
    full_rank: bool
    """Train the full-rank LLaMA baseline instead of CoLA."""
    cola_rank: int | None
    hidden_size: int | None
    ffn_hidden_size: int | None
    num_layers: int | None
    num_attention_heads: int | None
    """Overrides of the size's defaults (``None``: the size's value)."""
    seq_length: int
    recompute: str
    """Activation recomputation: ``none``, ``full`` or ``cola-m``."""
    make_vocab_size_divisible_by: int
    # training
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    train_tokens: int | None
    exit_interval: int | None
    seed: int
    bf16: bool
    fp16: bool
    zero_stage: int
    tensor_model_parallel_size: int
    cola_tp_scheme: str
    """Tensor-parallel scheme of CoLA models (``--cola-tp-scheme``: ``config.TP_SCHEMES``)."""
    deepspeed_config: str | None
    deepspeed: bool
    local_rank: int | None
    device: str
    # optimizer and schedule
    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_iters: int
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    # data
    data_path: tuple[str, ...]
    """``PREFIX`` or ``WEIGHT PREFIX WEIGHT PREFIX ...``."""
    split: str
    data_cache_path: str | None
    tokenizer_type: str
    tokenizer_model: str | None
    vocab_size: int | None
    """Vocab of the ``NullTokenizer`` (``None`` for the others)."""
    num_workers: int
    # checkpoints, evaluation, logging
    save: str | None
    load: str | None
    save_interval: int | None
    finetune: bool
    no_load_optim: bool
    no_load_rng: bool
    override_opt_param_scheduler: bool
    """On resume, the LR schedule comes from the flags (default: from the checkpoint)."""
    use_checkpoint_opt_param_scheduler: bool
    """On resume, the LR schedule comes from the checkpoint (the default, said explicitly)."""
    eval_interval: int
    eval_iters: int
    log_interval: int
    tensorboard_dir: str | None
    peak_tflops: float | None
    """The peak TFLOP/s MFU is measured against (``--peak-tflops``); ``None``: the GPU's from the table."""
    # run-time guards (training/guards.py)
    check_for_nan_in_loss_and_grad: bool
    """Skip a step whose loss or grad norm is non-finite (on every rank)."""
    max_consecutive_skipped_iters: int
    """Stop with a ``TrainingError`` after this many skipped steps in a row."""
    exit_signal_handler: bool
    """SIGTERM/SIGUSR1: save at the next step boundary and exit 0."""
    exit_duration_in_mins: float | None
    """Save and exit 0 after this many minutes."""
    # execution options: how the model runs, not what it computes
    compile: bool
    """``torch.compile`` each decoder block (``--compile``)."""
    compile_mode: str
    """``torch.compile`` mode of ``--compile`` (``--compile-mode``; ``model.compile.COMPILE_MODES``)."""
    grouped_projections: bool
    """One GEMM for q/k/v and one for gate/up (``--grouped-projections``)."""
    chunked_loss: bool
    """LM head and loss a chunk of tokens at a time, no full-vocab logits (``--chunked-loss``)."""
    # Weights & Biases (training/logging_utils.py); None: not logged there
    wandb_project: str | None
    wandb_exp_name: str | None
    wandb_save_dir: str | None
    # hangs, stragglers and data safety (training/watchdog.py, training/checkpointing.py)
    distributed_timeout_minutes: float
    """Timeout of every process group (``--distributed-timeout-minutes``)."""
    hang_timeout_minutes: float | None
    """No step for this long: stacks and exit (``None``: from the step time; 0: off)."""
    log_straggler: bool
    """Slowest and fastest rank's step time at each log line."""
    allow_data_change: bool
    """Resume although ``--data-path``/``--split`` changed (recorded in the data history)."""
    # checkpoint saving (issue 19: docs/reliability.md)
    async_save: bool
    """Write checkpoints in the background; training pauses only for a host-memory snapshot."""
    save_interval_minutes: float | None
    """Also save once this many minutes passed since the last save (checked at log intervals)."""
    keep_last_checkpoints: int | None
    """Keep only the newest K complete checkpoints in ``--save``."""
    # derived
    world_size: int
    """Processes in the job (from the launcher's environment)."""
    data_parallel_size: int
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step on each data-parallel rank."""
    user_ds_config: Mapping[str, Any] | None
    """The parsed ``--deepspeed_config`` file, or ``None`` when the config is generated from the flags."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples become lists), e.g. to record in a checkpoint."""
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out
