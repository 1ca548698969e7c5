"""Saving and resuming a training run on top of ``megatron_cola.checkpoint`` (the on-disk format).

This module holds the training side's policy: what goes into the client state (the iteration, consumed
samples, the flags that define the run), which flags must agree for an exact resume, and the order of
the writes (DeepSpeed state, model files, RNG states, then ``latest``). A kill during a save leaves
``latest`` pointing at the previous checkpoint, which stays loadable.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from megatron_cola.checkpoint import CheckpointReader, CheckpointWriter, model_file_name, save_model_file
from megatron_cola.checkpoint.deepspeed_state import (
    gathered_state_dict,
    has_deepspeed_state,
    load_engine_state,
    load_rng_state,
    peek_client_state,
    save_engine_state,
    save_rng_state,
)
from megatron_cola.config import EXECUTION_FIELDS, ModelArgs
from megatron_cola.errors import CheckpointError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.train_config import TrainConfig

# Flags that must agree between a checkpoint and the run resuming it, and what to do otherwise.
_MUST_MATCH = {
    "seq_length": "--seq-length",
    "global_batch_size": "--global-batch-size",
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "train_iters": "--train-iters",
    "lr": "--lr",
    "lr_decay_style": "--lr-decay-style",
    "min_lr": "--min-lr",
    "lr_warmup_iters": "--lr-warmup-iters",
    "lr_decay_iters": "--lr-decay-iters",
    "seed": "--seed",
}
_RECORDED_FLAGS = sorted(
    set(_MUST_MATCH)
    | {
        "zero_stage",
        "bf16",
        "micro_batch_size",
        "data_path",
        "split",
        "tokenizer_type",
        "tokenizer_model",
        "model_size",
        "full_rank",
        "weight_decay",
        "clip_grad",
    }
)


def recorded_flags(cfg: TrainConfig) -> dict[str, Any]:
    """The flags saved with every checkpoint (plain values: lists, not tuples)."""
    values = cfg.to_dict()
    return {k: values[k] for k in _RECORDED_FLAGS}


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any,
    cfg: TrainConfig,
    model_args: ModelArgs,
    parallel: ParallelState,
    iteration: int,
    consumed_samples: int,
    tokenizer_info: dict[str, Any] | None,
    vocab_size: int,
    split_dims: dict[str, int],
) -> str:
    """Save everything needed to resume exactly, then mark the checkpoint complete in ``latest``."""
    writer = CheckpointWriter(cfg.save, iteration)
    client_state = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "args": recorded_flags(cfg),
        "model_args": model_args.to_dict(),
        "world_size": cfg.world_size,
        "zero_stage": cfg.zero_stage,
    }
    save_engine_state(engine, writer, client_state)
    state = gathered_state_dict(engine, cfg.zero_stage, keep=parallel.dp_rank == 0)
    if parallel.dp_rank == 0:
        save_model_file(
            writer.path(model_file_name(parallel.tp_rank)),
            state,
            model_args.to_dict(),
            split_dims,
            tp_rank=parallel.tp_rank,
            tp_size=parallel.tp_size,
            vocab_size=vocab_size,
            iteration=iteration,
            tokenizer=tokenizer_info,
        )
    save_rng_state(writer, _global_rank())
    _barrier()
    if _global_rank() == 0:
        writer.commit()
    _barrier()
    return writer.dir


def check_compatible(client_state: dict[str, Any], cfg: TrainConfig, model_args: ModelArgs) -> None:
    """Refuse a resume whose flags would not continue the same run."""
    # A field the checkpoint predates has its default meaning (e.g. mlp_gate_act = silu).
    saved_model = {**ModelArgs.field_defaults(), **client_state.get("model_args", {})}
    ours = model_args.to_dict()
    for key in (*EXECUTION_FIELDS, "max_seq_length"):
        saved_model.pop(key, None)
        ours.pop(key, None)
    diffs = [
        f"{k}: checkpoint {saved_model.get(k)!r}, this run {v!r}"
        for k, v in ours.items()
        if saved_model.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            "the checkpoint's model differs from this run's: "
            + "; ".join(diffs)
            + ". Use the same model flags, or --finetune to load only matching weights"
        )
    saved = client_state.get("args", {})
    problems = [
        f"{flag} was {saved[key]!r}, now {getattr(cfg, key)!r}"
        for key, flag in _MUST_MATCH.items()
        if key in saved and saved[key] != getattr(cfg, key)
    ]
    if (
        saved.get("zero_stage") is not None
        and saved["zero_stage"] != cfg.zero_stage
        and not cfg.no_load_optim
    ):
        problems.append(
            f"--zero-stage was {saved['zero_stage']}, now {cfg.zero_stage} (optimizer states are laid out "
            "per stage: add --no-load-optim to start the optimizer afresh)"
        )
    saved_world = client_state.get("world_size")
    if saved_world not in (None, cfg.world_size) and not cfg.no_load_optim and cfg.zero_stage > 0:
        problems.append(
            f"the checkpoint was written by {saved_world} processes and this run has {cfg.world_size}; "
            "ZeRO optimizer shards need the same data-parallel size (or add --no-load-optim)"
        )
    if problems:
        raise CheckpointError("cannot resume exactly from this checkpoint: " + "; ".join(problems))


def load_checkpoint(engine: Any, cfg: TrainConfig, model_args: ModelArgs) -> tuple[int, int] | None:
    """Resume from ``cfg.load``: returns ``(iteration, consumed_samples)``, or ``None`` when the
    directory holds no complete checkpoint with DeepSpeed state (weights-only dirs are handled before
    the engine is built, by ``checkpoint.weights.load_weights_only``)."""
    reader = CheckpointReader.latest(cfg.load)
    if reader is None or not has_deepspeed_state(reader):
        return None
    meta, saved_tp = peek_client_state(reader)
    if saved_tp != cfg.tensor_model_parallel_size:
        raise CheckpointError(
            f"{reader.dir} was saved with tensor-model-parallel size {saved_tp}, this run uses "
            f"{cfg.tensor_model_parallel_size}; resume with --tensor-model-parallel-size {saved_tp} "
            "(or --finetune to load only the weights into the new layout)"
        )
    check_compatible(meta, cfg, model_args)
    client_state = load_engine_state(engine, reader, load_optimizer_states=not cfg.no_load_optim)
    if not cfg.no_load_rng:
        load_rng_state(reader, _global_rank())
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
