"""Saving and resuming: DeepSpeed's engine/optimizer state, our model files, RNG states, ``latest``.

Layout of ``--save DIR`` (Megatron's tags, DeepSpeed's files):
```
DIR/latest                      the tag of the newest complete checkpoint (written last, atomically)
DIR/ds_config.json              the DeepSpeed config of the run
DIR/iter_0000100/               DeepSpeed: mp_rank_XX_model_states.pt, *_optim_states.pt (+ client state)
DIR/iter_0000100/model_tpNN.pt  model weights per TP rank, gathered whatever the ZeRO stage (model_files.py)
DIR/iter_0000100/rng_state_RRRRR.pt  RNG states per global rank
```
A kill during a save leaves ``latest`` pointing at the previous checkpoint, which stays loadable.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_cola.config import EXECUTION_FIELDS, ModelArgs
from megatron_cola.errors import CheckpointError  # noqa: F401  (re-exported)
from megatron_cola.model.sharding import full_shape as sharded_full_shape
from megatron_cola.model.sharding import load_full_
from megatron_cola.model.transformer import param_seed
from megatron_cola.training.model_files import (
    LATEST_FILE,
    atomic_torch_save,
    atomic_write_text,
    iteration_tag,
    load_full_state_dict,
    model_file_name,
    read_latest,
    save_model_file,
)

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
        "min_lr",
        "lr_warmup_iters",
        "weight_decay",
        "clip_grad",
    }
)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in _RECORDED_FLAGS}


def _gathered_state_dict(engine: Any, zero_stage: int, keep: bool) -> dict[str, torch.Tensor]:
    """This rank's (TP-local) full parameters, copied to CPU when ``keep`` (the writing rank).

    Under ZeRO-3 every rank takes part in gathering, one block (or embedding/norm/head) at a time, so no
    more than one layer is ever materialised beyond the shards.
    """
    module = engine.module
    out: dict[str, torch.Tensor] = {}
    if zero_stage < 3:
        if keep:
            out = {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters()}
        return out
    import deepspeed

    units: list[tuple[str, torch.nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            units += [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
        else:
            units.append((name, child))
    for prefix, unit in units:
        params = list(unit.parameters())
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if keep:
                for n, p in unit.named_parameters():
                    out[f"{prefix}.{n}"] = p.detach().to("cpu", copy=True)
    return out


def save_checkpoint(
    engine: Any,
    args: argparse.Namespace,
    model_args: ModelArgs,
    parallel: Any,
    iteration: int,
    consumed_samples: int,
    tokenizer_info: dict[str, Any] | None,
    vocab_size: int,
    split_dims: dict[str, int],
) -> str:
    """Save everything needed to resume exactly, then mark the checkpoint complete in ``latest``."""
    tag = iteration_tag(iteration)
    client_state = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "args": recorded_flags(args),
        "model_args": model_args.to_dict(),
        "world_size": args.world_size,
        "zero_stage": args.zero_stage,
    }
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state, save_latest=False)
    ckpt_dir = os.path.join(args.save, tag)
    state = _gathered_state_dict(engine, args.zero_stage, keep=parallel.dp_rank == 0)
    if parallel.dp_rank == 0:
        save_model_file(
            os.path.join(ckpt_dir, model_file_name(parallel.tp_rank)),
            state,
            model_args.to_dict(),
            split_dims,
            tp_rank=parallel.tp_rank,
            tp_size=parallel.tp_size,
            vocab_size=vocab_size,
            iteration=iteration,
            tokenizer=tokenizer_info,
        )
    rank = dist.get_rank() if dist.is_initialized() else 0
    atomic_torch_save(_rng_state(), os.path.join(ckpt_dir, f"rng_state_{rank:05d}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        atomic_write_text(os.path.join(args.save, LATEST_FILE), tag + "\n")
        atomic_write_text(os.path.join(args.save, "latest_checkpointed_iteration.txt"), f"{iteration}\n")
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir


def _engine_state_files(ckpt_dir: str) -> dict[int, str]:
    """``{tp rank: file holding the client state}``: ``mp_rank_XX_model_states.pt`` for ZeRO 0-2,
    ``zero_pp_rank_0_mp_rank_XX_model_states.pt`` for ZeRO-3."""
    out: dict[int, str] = {}
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "*mp_rank_*_model_states.pt"))):
        m = re.search(r"(zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$", path)
        if m and (m.group(2) is None or m.group(2) == "0"):
            out.setdefault(int(m.group(3)), path)
    return out


def has_deepspeed_state(ckpt_dir: str) -> bool:
    return bool(_engine_state_files(ckpt_dir))


def load_weights_only(
    model: torch.nn.Module,
    load_dir: str,
    iteration: int | None = None,
    seed: int = 1234,
    init_std: float = 0.02,
) -> dict[str, Any]:
    """Copy a checkpoint's weights (any TP layout it was saved with) into ``model`` (any TP layout).

    Used by ``--finetune`` and for checkpoints converted from Hugging Face (model files, no DeepSpeed
    state). Embedding/head rows beyond the checkpoint's vocab keep their fresh initialisation.
    """
    state, meta = load_full_state_dict(load_dir, iteration)
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint in {load_dir} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was it saved with a different --model-size / --full-rank?)"
        )
    with torch.no_grad():
        for name in own:
            full = state[name]
            full_shape = sharded_full_shape(model, name)
            if name in ("embed_tokens.weight", "lm_head.weight") and full.shape[0] != full_shape[0]:
                # Different vocab padding: rows past the checkpoint's vocab get a fresh seeded init.
                gen = torch.Generator().manual_seed(param_seed(seed, name))
                grown = torch.empty(full_shape).normal_(0.0, init_std, generator=gen)
                n = min(full.shape[0], full_shape[0])
                grown[:n] = full[:n]
                full = grown
            if tuple(full.shape) != full_shape:
                raise CheckpointError(
                    f"tensor {name}: checkpoint shape {tuple(full.shape)} != model shape {full_shape}"
                )
            load_full_(model, name, full)  # this rank's shard of the full tensor
    return meta


# Architecture details a weights-only load takes from the checkpoint rather than from --model-size.
_ADOPTED_FIELDS = ("norm_eps", "rope_theta", "gate_activation", "cola_activation", "init_std")


def adopt_architecture(model_args: ModelArgs, load_dir: str) -> tuple[ModelArgs, dict[str, Any]]:
    """``model_args`` with the checkpoint's values of ``_ADOPTED_FIELDS``, and what changed."""
    tag = read_latest(load_dir)
    paths = sorted(glob.glob(os.path.join(load_dir, tag or "", "model_tp*.pt"))) if tag else []
    if not paths:
        raise CheckpointError(f"{load_dir}/{tag}: no model_tpNN.pt files to load weights from")
    saved = torch.load(paths[0], map_location="cpu", weights_only=False, mmap=True)["args"]
    changes = {k: saved[k] for k in _ADOPTED_FIELDS if k in saved and saved[k] != getattr(model_args, k)}
    return (model_args.replace(**changes) if changes else model_args), changes


def check_compatible(client_state: dict[str, Any], args: argparse.Namespace, model_args: ModelArgs) -> None:
    """Refuse a resume whose flags would not continue the same run."""
    saved_model = dict(client_state.get("model_args", {}))
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
    problems = []
    for key, flag in _MUST_MATCH.items():
        if key in saved and saved[key] != getattr(args, key, None):
            problems.append(f"{flag} was {saved[key]!r}, now {getattr(args, key, None)!r}")
    if (
        saved.get("zero_stage") is not None
        and saved["zero_stage"] != args.zero_stage
        and not args.no_load_optim
    ):
        problems.append(
            f"--zero-stage was {saved['zero_stage']}, now {args.zero_stage} (optimizer states are laid out "
            "per stage: add --no-load-optim to start the optimizer afresh)"
        )
    if client_state.get("world_size") not in (None, args.world_size) and not args.no_load_optim:
        if args.zero_stage > 0:
            problems.append(
                f"the checkpoint was written by {client_state['world_size']} processes and this run has "
                f"{args.world_size}; ZeRO optimizer shards need the same data-parallel size "
                "(or add --no-load-optim)"
            )
    if problems:
        raise CheckpointError("cannot resume exactly from this checkpoint: " + "; ".join(problems))


def load_checkpoint(engine: Any, args: argparse.Namespace, model_args: ModelArgs) -> tuple[int, int] | None:
    """Resume from ``args.load``: returns ``(iteration, consumed_samples)``, or ``None`` when the
    directory holds no complete checkpoint with DeepSpeed state (weights-only dirs are handled before
    the engine is built, by ``load_weights_only``)."""
    tag = read_latest(args.load)
    if tag is None:
        return None
    ckpt_dir = os.path.join(args.load, tag)
    if not has_deepspeed_state(ckpt_dir):
        return None
    tp_files = _engine_state_files(ckpt_dir)
    if len(tp_files) != args.tensor_model_parallel_size:
        raise CheckpointError(
            f"{ckpt_dir} was saved with tensor-model-parallel size {len(tp_files)}, this run uses "
            f"{args.tensor_model_parallel_size}; resume with --tensor-model-parallel-size {len(tp_files)} "
            "(or --finetune to load only the weights into the new layout)"
        )
    # Peek at the client state first, so an incompatible run fails before DeepSpeed touches anything.
    meta = torch.load(tp_files[min(tp_files)], map_location="cpu", weights_only=False)
    check_compatible(meta, args, model_args)
    _, client_state = engine.load_checkpoint(
        args.load,
        tag=tag,
        load_optimizer_states=not args.no_load_optim,
        load_lr_scheduler_states=True,  # the schedule continues at the iteration even with --no-load-optim
    )
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_path = os.path.join(ckpt_dir, f"rng_state_{rank:05d}.pt")
    if not args.no_load_rng and os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
