"""Saving and resuming a training run on top of ``megatron_cola.checkpoint`` (the on-disk format).

This module holds the training side's policy: what goes into the client state (the iteration, consumed
samples, the flags that define the run), which flags must agree for an exact resume, and the order of
the writes (finite-weights check, DeepSpeed state, model files, RNG states, the manifest, then ``latest``),
and which checkpoint a run starts from (``select_for_run``) and may write into (``check_save_dir``). A kill
during a save leaves ``latest`` pointing at the previous checkpoint, which stays loadable.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
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
from megatron_cola.checkpoint.layout import read_latest
from megatron_cola.checkpoint.manifest import verify_checkpoint
from megatron_cola.checkpoint.recovery import (
    Selection,
    complete_checkpoints,
    is_disk_full,
    move_aside,
    newest_file,
    select_checkpoint,
)
from megatron_cola.config import EXECUTION_FIELDS, ModelArgs
from megatron_cola.errors import CheckpointError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.logging_utils import print_rank_0
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


def _data_entry(cfg: TrainConfig, iteration: int, consumed_samples: int) -> dict[str, Any]:
    return {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "data_path": list(cfg.data_path),
        "split": cfg.split,
    }


def initial_data_history(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The data history of a run that starts at iteration 0: its ``--data-path`` and ``--split``."""
    return [_data_entry(cfg, 0, 0)]


def _normalized_data_path(data_path: list[str] | tuple[str, ...]) -> list[Any]:
    """Weights as numbers, prefixes as real paths: ``./c4`` and ``/abs/c4`` are the same corpus."""
    items = list(data_path)
    weighted = len(items) > 1
    out: list[Any] = []
    for i, item in enumerate(items):
        if weighted and i % 2 == 0:
            try:
                out.append(float(item))
                continue
            except ValueError:
                pass
        out.append(os.path.realpath(item))
    return out


def resumed_data_history(
    client_state: dict[str, Any], cfg: TrainConfig, iteration: int, consumed_samples: int
) -> list[dict[str, Any]]:
    """The data history a resumed run carries on: the checkpoint's, plus an entry when ``--data-path``
    or ``--split`` changed (allowed only with ``--allow-data-change``; ``CheckpointError`` otherwise).

    Checkpoints written before the history existed hold only their flags: their history is one entry
    at iteration 0 with the recorded ``--data-path`` and ``--split``."""
    saved = client_state.get("args", {})
    history = client_state.get("data_history")
    if not history:
        if "data_path" not in saved:
            return [_data_entry(cfg, iteration, consumed_samples)]
        history = [
            {
                "iteration": 0,
                "consumed_samples": 0,
                "data_path": saved["data_path"],
                "split": saved.get("split"),
            }
        ]
    last = history[-1]
    same_path = list(last["data_path"]) == list(cfg.data_path) or _normalized_data_path(
        last["data_path"]
    ) == _normalized_data_path(cfg.data_path)
    same_split = last.get("split") in (None, cfg.split)
    if same_path and same_split:
        return [dict(entry) for entry in history]
    changes = []
    if not same_path:
        changes.append(f"--data-path was {' '.join(last['data_path'])}, now {' '.join(cfg.data_path)}")
    if not same_split:
        changes.append(f"--split was {last['split']}, now {cfg.split}")
    if not cfg.allow_data_change:
        raise CheckpointError(
            "the data changed since the checkpoint: "
            + "; ".join(changes)
            + f". The run would continue at consumed sample {consumed_samples} (iteration {iteration}) of "
            "another corpus or split. Resume with the checkpoint's --data-path and --split, or pass "
            "--allow-data-change to do this on purpose (continued pre-training, annealing); the change is "
            "then recorded in the checkpoint's data history"
        )
    print_rank_0(f"> --allow-data-change: from iteration {iteration}: " + "; ".join(changes))
    return [*(dict(entry) for entry in history), _data_entry(cfg, iteration, consumed_samples)]


def recorded_flags(cfg: TrainConfig) -> dict[str, Any]:
    """The flags saved with every checkpoint (plain values: lists, not tuples)."""
    values = cfg.to_dict()
    return {k: values[k] for k in _RECORDED_FLAGS}


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_finite(state: dict[str, Any], parallel: ParallelState) -> str | None:
    """The first non-finite parameter of any rank's gathered weights (all ranks agree), or ``None``."""
    bad = next((n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if not dist.is_initialized():
        return bad
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, bad)
    return next((n for n in names if n is not None), None)


def _save_files(
    writer: CheckpointWriter,
    engine: Any,
    state: dict[str, Any],
    client_state: dict[str, Any],
    parallel: ParallelState,
    meta: dict[str, Any],
) -> None:
    save_engine_state(engine, writer, client_state)
    if parallel.dp_rank == 0:
        save_model_file(writer.path(model_file_name(parallel.tp_rank)), state, **meta)
    save_rng_state(writer, _global_rank())


def _prepare_dir(writer: CheckpointWriter) -> None:
    """Never write into a complete checkpoint; move an incomplete/corrupt directory of the same name aside."""
    if not os.path.isdir(writer.dir):
        return
    if read_latest(writer.root) == writer.tag or not verify_checkpoint(writer.dir):
        raise CheckpointError(
            f"{writer.dir} already holds a complete checkpoint; this run would overwrite it: pass --load "
            f"{writer.root} to resume, or choose another --save"
        )
    _barrier()
    if _global_rank() == 0:
        print_rank_0(f"> moved the incomplete/corrupt {writer.dir} aside to {move_aside(writer.dir)}")
    _barrier()


def _disk_full_error(writer: CheckpointWriter, err: BaseException) -> CheckpointError:
    """Remove the partial directory; the error names the file and the last complete checkpoint."""
    culprit = newest_file(writer.dir) or writer.dir
    shutil.rmtree(writer.dir, ignore_errors=True)
    last = read_latest(writer.root)
    return CheckpointError(
        f"no space left on device while writing {culprit}; the last complete checkpoint is "
        f"{os.path.join(writer.root, last) if last else 'none (nothing was saved yet)'}. The partial "
        f"{writer.dir} was removed; free space or choose another --save"
    )


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
    data_history: list[dict[str, Any]] | None = None,
) -> str:
    """Save everything needed to resume exactly, write the manifest, then mark the checkpoint complete in
    ``latest``. Weights that are not finite are never written (``CheckpointError``, ``latest`` unchanged);
    a full disk removes the partial directory and raises ``CheckpointError``."""
    writer = CheckpointWriter(cfg.save, iteration)
    client_state = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "args": recorded_flags(cfg),
        "model_args": model_args.to_dict(),
        "world_size": cfg.world_size,
        "zero_stage": cfg.zero_stage,
        # --data-path/--split of every stretch of the run (resumes with --allow-data-change add one).
        "data_history": data_history if data_history is not None else initial_data_history(cfg),
    }
    state = gathered_state_dict(engine, cfg.zero_stage, keep=parallel.dp_rank == 0)
    bad = _all_finite(state, parallel)
    if bad is not None:
        raise CheckpointError(
            f"parameter {bad} holds NaN/Inf at iteration {iteration}: checkpoint {writer.dir} was not "
            f"written and {cfg.save}/latest still names the last good one; lower --lr or resume from it"
        )
    meta = dict(
        args=model_args.to_dict(),
        split_dims=split_dims,
        tp_rank=parallel.tp_rank,
        tp_size=parallel.tp_size,
        vocab_size=vocab_size,
        iteration=iteration,
        tokenizer=tokenizer_info,
    )
    _prepare_dir(writer)
    try:
        _save_files(writer, engine, state, client_state, parallel, meta)
        _barrier()
        writer.finalize("training")
    except (OSError, RuntimeError) as e:
        if is_disk_full(e, writer.dir):
            raise _disk_full_error(writer, e) from e
        raise
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


def load_checkpoint(
    engine: Any, cfg: TrainConfig, model_args: ModelArgs, reader: CheckpointReader
) -> tuple[int, int, list[dict[str, Any]]]:
    """Resume from ``reader``'s checkpoint (chosen and verified by ``select_checkpoint``): returns
    ``(iteration, consumed_samples, data_history)``. A changed ``--data-path``/``--split`` is refused
    before anything is loaded unless ``--allow-data-change``."""
    if not has_deepspeed_state(reader):
        raise CheckpointError(
            f"{reader.dir} holds no DeepSpeed state (mp_rank_XX_model_states.pt) to resume from; pass "
            "--finetune to load only its weights"
        )
    meta, saved_tp = peek_client_state(reader)
    if saved_tp != cfg.tensor_model_parallel_size:
        raise CheckpointError(
            f"{reader.dir} was saved with tensor-model-parallel size {saved_tp}, this run uses "
            f"{cfg.tensor_model_parallel_size}; resume with --tensor-model-parallel-size {saved_tp} "
            "(or --finetune to load only the weights into the new layout)"
        )
    check_compatible(meta, cfg, model_args)
    history = resumed_data_history(meta, cfg, int(meta["iteration"]), int(meta["consumed_samples"]))
    client_state = load_engine_state(engine, reader, load_optimizer_states=not cfg.no_load_optim)
    if not cfg.no_load_rng:
        load_rng_state(reader, _global_rank())
    return int(client_state["iteration"]), int(client_state["consumed_samples"]), history


def select_for_run(cfg: TrainConfig) -> Selection | None:
    """The checkpoint this run starts from (collective): ``select_checkpoint(--load)`` with its notes
    printed and, when ``--save`` is the same directory, skipped corrupt checkpoints moved aside."""
    if not cfg.load:
        return None
    sel = select_checkpoint(cfg.load, finetune=cfg.finetune)
    if sel is None:
        print_rank_0(f"> no checkpoint in {cfg.load} yet: starting from scratch")
        return None
    for note in sel.notes:
        print_rank_0(f"> {note}")
    if sel.skipped and cfg.save and os.path.realpath(cfg.save) == os.path.realpath(cfg.load):
        _barrier()
        if _global_rank() == 0:
            for d in sel.skipped:
                print_rank_0(f"> moved the corrupt {d} aside to {move_aside(d)}")
        _barrier()
    return sel


def check_save_dir(cfg: TrainConfig, resumed_from: CheckpointReader | None) -> None:
    """Refuse to start a run whose ``--save`` holds complete checkpoints it did not resume from."""
    if not cfg.save:
        return
    if resumed_from is not None and os.path.realpath(resumed_from.root) == os.path.realpath(cfg.save):
        return
    found = complete_checkpoints(cfg.save)
    if found:
        raise CheckpointError(
            f"--save {cfg.save} already holds complete checkpoints ({', '.join(found[:3])}) that this run "
            f"did not resume from, and would overwrite them: pass --load {cfg.save} to resume, or choose "
            "another --save"
        )
