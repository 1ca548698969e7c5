"""Saving and resuming a training run on top of ``megatron_cola.checkpoint`` (the on-disk format).

This module holds the training side's policy: what goes into the client state (the iteration, consumed
samples, the flags that define the run), which flags must agree for an exact resume, and the order of
the writes (finite-weights check, DeepSpeed state, model files, RNG states, the ranks' agreement that
every file was written, the manifest, then ``latest``), when a background save (``AsyncSaves``,
``--async-save``) is waited for and agreed on, and which checkpoint a run starts from (``select_for_run``)
and may write into (``check_save_dir``, ``lock_save_dir``). A kill during a save leaves ``latest``
pointing at the previous checkpoint, which stays loadable.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch.distributed as dist

from megatron_cola.checkpoint import CheckpointReader, CheckpointWriter, model_file_name
from megatron_cola.checkpoint.async_save import BackgroundSave
from megatron_cola.checkpoint.deepspeed_state import (
    gathered_state_dict,
    has_deepspeed_state,
    load_engine_state,
    load_rng_state,
    peek_client_state,
    save_engine_state,
    save_rng_state,
)
from megatron_cola.checkpoint.io import HostBuffers, failure_message, first_non_finite
from megatron_cola.checkpoint.layout import read_latest
from megatron_cola.checkpoint.lock import SaveDirLock
from megatron_cola.checkpoint.manifest import verify_checkpoint
from megatron_cola.checkpoint.model_files import load_model_files, merge_tp_shards, model_file_payload
from megatron_cola.checkpoint.optim_state import (
    gather_optimizer_state,
    has_optim_files,
    load_module_state,
    load_optim_files,
    optim_file_name,
    optim_file_payload,
    restore_optimizer_state,
)
from megatron_cola.checkpoint.recovery import (
    Selection,
    complete_checkpoints,
    move_aside,
    prune_checkpoints,
    select_checkpoint,
)
from megatron_cola.config import EXECUTION_FIELDS, ModelArgs
from megatron_cola.errors import CheckpointError
from megatron_cola.model.sharding import sharding_plan
from megatron_cola.parallel import ParallelState
from megatron_cola.training.logging_utils import print_rank_0
from megatron_cola.training.schedule import SCHEDULE_FLAGS, Schedule, show_value
from megatron_cola.training.train_config import TrainConfig

# Flags that must agree between a checkpoint and the run resuming it (the refusal says what to pass).
# The LR schedule is not among them: the checkpoint's is kept unless --override-opt-param-scheduler
# (``resumed_schedule``), and --train-iters is only the loop's length, so a finished run can be extended.
_MUST_MATCH = {
    "seq_length": "--seq-length",
    "global_batch_size": "--global-batch-size",
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "seed": "--seed",
}
# What else a refusal says, per flag.
_MUST_MATCH_HINTS = {
    "global_batch_size": "an iteration of the checkpoint's schedule is one batch of that size; to change "
    "it, --finetune starts a fresh schedule from the checkpoint's weights",
}
_RECORDED_FLAGS = sorted(
    set(_MUST_MATCH)
    | set(SCHEDULE_FLAGS)
    | {
        "train_iters",
        "zero_stage",
        "cola_tp_scheme",  # absent from older checkpoints: they were all "split-rank"
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
    bad = first_non_finite(state)
    if not dist.is_initialized():
        return bad
    names: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(names, bad)
    return next((n for n in names if n is not None), None)


def _agree(mine: Any) -> list[Any]:
    """Every rank's ``mine`` (collective: all ranks call it at the same point)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


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


class AsyncSaves:
    """``--async-save``: at most one checkpoint written in the background (``checkpoint.async_save``).

    ``poll`` (after every step, no collective) raises this rank's failure as soon as it is known: a rank
    whose files failed, and rank 0, which learns every rank's outcome from the status files. ``wait``
    (before the next save and before exit: points where every rank is anyway) joins the thread and has
    the ranks agree, so that all of them raise the same ``CheckpointError``. ``close`` (on an error path)
    lets this rank's files finish without any collective.
    """

    def __init__(self, keep_last: int | None = None) -> None:
        self.keep_last = keep_last
        self.pending: BackgroundSave | None = None
        self.buffers = HostBuffers()  # the snapshots' host memory, reused by every save

    def start(self, writer: CheckpointWriter, check_finite: dict[str, Any] | None = None) -> BackgroundSave:
        world = dist.get_world_size() if dist.is_initialized() else 1
        bg = BackgroundSave(writer, world, keep_last=self.keep_last, log=_log_now, check_finite=check_finite)
        self.pending = bg.start()
        return bg

    def poll(self) -> None:
        bg = self.pending
        if bg is not None and bg.done() and bg.error:
            self.pending = None
            self.buffers.release_all()
            raise CheckpointError(bg.error)

    def wait(self) -> float:
        """Wait for the pending save, agree on its outcome; returns the seconds waited."""
        bg, self.pending = self.pending, None
        start = time.perf_counter()
        if bg is not None:
            bg.join()
        self.buffers.release_all()  # the thread has written them: free for the next snapshot
        waited = time.perf_counter() - start
        outcomes = _agree(None if bg is None else (bg.failures, bg.error))
        seen: dict[tuple[int, str], dict[str, Any]] = {}  # rank 0 holds every rank's failures too
        for o in outcomes:
            for f in o[0] if o else []:
                seen.setdefault((f["rank"], f["path"]), f)
        failures = sorted(seen.values(), key=lambda f: (f["rank"], f["path"]))
        errors = [o[1] for o in outcomes if o and o[1]]
        if failures and bg is not None:
            raise CheckpointError(failure_message(bg.writer.root, bg.dir, failures))
        if errors:
            raise CheckpointError(errors[0])
        return waited

    def close(self) -> None:
        bg, self.pending = self.pending, None
        if bg is not None:
            bg.join(abort=True)


def _log_now(line: str) -> None:
    print(line, flush=True)


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
    saves: AsyncSaves | None = None,
    tp_scheme: str = "none",
) -> str:
    """Save everything needed to resume exactly, write the manifest, then mark the checkpoint complete in
    ``latest``. Weights that are not finite are never written (``CheckpointError``, ``latest`` unchanged).
    A file that fails on any rank (a full disk, a failing device) is named with its rank on every rank:
    the ranks agree before the manifest, the partial directory is removed and ``CheckpointError`` is
    raised. With ``saves`` (``--async-save``) the state is only snapshotted into host memory here, after
    the previous background save finished; the rest happens in the background (``AsyncSaves``)."""
    if saves is not None:
        saves.wait()
    rank = _global_rank()
    buffers = saves.buffers if saves is not None else None
    writer = CheckpointWriter(cfg.save, iteration, rank=rank, background=saves is not None, buffers=buffers)
    client_state = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        # The LR schedule in effect: after a resume, the checkpoint's unless --override-opt-param-scheduler.
        "args": {**recorded_flags(cfg), **engine.lr_scheduler.schedule.values()},
        "model_args": model_args.to_dict(),
        "world_size": cfg.world_size,
        "zero_stage": cfg.zero_stage,
        # The TP cut of every split parameter and the scheme that made it (a layout change on resume).
        "split_dims": dict(split_dims),
        "cola_tp_scheme": layout_scheme(cfg),
        # --data-path/--split of every stretch of the run (resumes with --allow-data-change add one).
        "data_history": data_history if data_history is not None else initial_data_history(cfg),
    }
    state = gathered_state_dict(
        engine, cfg.zero_stage, keep=parallel.dp_rank == 0, buffers=buffers, memo=writer.memo
    )
    # A background save checks its snapshot in the background (it is then never marked complete).
    bad = _all_finite(state, parallel) if saves is None else None
    if bad is not None:
        if buffers is not None:
            buffers.release_all()
        raise CheckpointError(
            f"parameter {bad} holds NaN/Inf at iteration {iteration}: checkpoint {writer.dir} was not "
            f"written and {cfg.save}/latest still names the last good one; lower --lr or resume from it"
        )
    meta = dict(
        args=model_args.to_dict(),
        split_dims=split_dims,
        tp_scheme=tp_scheme,
        tp_rank=parallel.tp_rank,
        tp_size=parallel.tp_size,
        vocab_size=vocab_size,
        iteration=iteration,
        tokenizer=tokenizer_info,
    )
    _prepare_dir(writer)
    save_engine_state(engine, writer, client_state)
    if parallel.dp_rank == 0:
        writer.save_torch(model_file_name(parallel.tp_rank), model_file_payload(state, **meta))
    if not cfg.no_save_reshardable_optim:
        # Collective over the data-parallel group: every rank takes part, DP rank 0 writes.
        optim, step = gather_optimizer_state(engine, keep=parallel.dp_rank == 0)
        if parallel.dp_rank == 0:
            payload = optim_file_payload(
                optim,
                step,
                split_dims,
                tp_rank=parallel.tp_rank,
                tp_size=parallel.tp_size,
                zero_stage=cfg.zero_stage,
                dp_size=parallel.dp_size,
                iteration=iteration,
            )
            writer.save_torch(optim_file_name(parallel.tp_rank), payload)
    save_rng_state(writer, rank)
    if saves is not None:
        saves.start(writer, check_finite=state)
        return writer.dir
    failures = [f for part in _agree(writer.failures) for f in part]  # every rank, before the manifest
    if failures:
        if rank == 0:
            shutil.rmtree(writer.dir, ignore_errors=True)
        raise CheckpointError(failure_message(writer.root, writer.dir, failures))
    writer.finalize("training")
    _barrier()
    if rank == 0:
        writer.commit()
        if cfg.keep_last_checkpoints:
            for d in prune_checkpoints(cfg.save, cfg.keep_last_checkpoints):
                print_rank_0(f"> deleted {d} (--keep-last-checkpoints {cfg.keep_last_checkpoints})")
    _barrier()
    return writer.dir


def layout_scheme(cfg: TrainConfig) -> str:
    """The TP scheme the run's parameters are cut by, as recorded in a checkpoint: ``--cola-tp-scheme``
    for a CoLA model under TP, ``dense`` for a full-rank one under TP, and ``split-rank`` at TP=1 (what
    every checkpoint recorded before the flag existed), so that changing the flag where it changes no cut
    is not a layout change."""
    if cfg.tensor_model_parallel_size == 1:
        return "split-rank"
    return "dense" if cfg.full_rank else str(cfg.cola_tp_scheme)


def saved_layout(client_state: dict[str, Any], saved_tp: int) -> dict[str, Any]:
    """The layout a checkpoint was written on: ``tp``, ``dp``, ``zero``, ``scheme`` and ``split_dims``
    (``None`` where a checkpoint predates the field). A checkpoint without a scheme is split-rank."""
    world = client_state.get("world_size")
    zero = client_state.get("zero_stage", client_state.get("args", {}).get("zero_stage"))
    return {
        "tp": saved_tp,
        "dp": world // saved_tp if world else None,
        "zero": zero,
        "scheme": client_state.get("cola_tp_scheme", "split-rank"),
        "split_dims": client_state.get("split_dims"),
    }


def current_layout(engine: Any, cfg: TrainConfig) -> dict[str, Any]:
    """This run's layout, as ``saved_layout`` describes a checkpoint's."""
    tp = cfg.tensor_model_parallel_size
    return {
        "tp": tp,
        "dp": cfg.world_size // tp,
        "zero": cfg.zero_stage,
        "scheme": layout_scheme(cfg),
        "split_dims": sharding_plan(engine.module).split_dims(),
    }


def layout_changed(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether the optimizer state of ``saved`` is laid out differently from ``now``'s: another TP size,
    TP cut (scheme, split dims), ZeRO stage or data-parallel size. Fields a checkpoint lacks count as
    unchanged."""
    for key in ("tp", "dp", "zero", "scheme", "split_dims"):
        if saved[key] is not None and saved[key] != now[key]:
            return True
    return False


def describe_layout(layout: dict[str, Any], with_scheme: bool = False) -> str:
    """``TP2 x DP4 ZeRO-1`` (``TP2 (bottleneck) x DP4 ZeRO-1`` with the scheme)."""
    scheme = f" ({layout['scheme']})" if with_scheme else ""
    dp = layout["dp"] if layout["dp"] is not None else "?"
    return f"TP{layout['tp']}{scheme} x DP{dp} ZeRO-{layout['zero']}"


def check_reshardable(reader: CheckpointReader, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether this resume takes the resharded path: the layout changed and the checkpoint holds the
    layout-free optimizer state (``optim_tpNN.pt``). Without it, a changed TP size or TP cut is refused
    (and a changed ZeRO stage or data-parallel size by ``check_compatible``, unless --no-load-optim)."""
    if not layout_changed(saved, now) or has_optim_files(reader):
        return layout_changed(saved, now)
    why = (
        f"{reader.dir} holds no layout-free optimizer state (optim_tpNN.pt: it was saved with "
        "--no-save-reshardable-optim or by an older version), which a resume on another layout needs"
    )
    if saved["tp"] != now["tp"]:
        raise CheckpointError(
            f"{reader.dir} was saved with tensor-model-parallel size {saved['tp']}, this run uses "
            f"{now['tp']}; resume with --tensor-model-parallel-size {saved['tp']} "
            f"(or --finetune to load only the weights into the new layout). {why}"
        )
    if saved["scheme"] != now["scheme"] or (
        saved["split_dims"] is not None and saved["split_dims"] != now["split_dims"]
    ):
        raise CheckpointError(
            f"{reader.dir} was saved with --cola-tp-scheme {saved['scheme']}, this run uses {now['scheme']}; "
            f"resume with --cola-tp-scheme {saved['scheme']} (or --finetune to load only the weights). {why}"
        )
    return False


def check_compatible(
    client_state: dict[str, Any], cfg: TrainConfig, model_args: ModelArgs, reshard: bool = False
) -> None:
    """Refuse a resume whose flags would not continue the same run. ``reshard``: the optimizer state is
    rebuilt for this run's layout (``check_reshardable``), so TP size, ZeRO stage and data-parallel size
    may differ."""
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
    saved = client_state.get("args", {})
    if diffs:
        hint = ""
        tp_now = getattr(cfg, "tensor_model_parallel_size", None)
        tp_saved = saved.get("tensor_model_parallel_size", tp_now)
        if saved_model.get("vocab_size") != ours.get("vocab_size") and tp_saved != tp_now:
            hint = (
                f" (the padded vocabulary is a multiple of --make-vocab-size-divisible-by times the TP size: "
                f"choose --make-vocab-size-divisible-by so that it is {saved_model.get('vocab_size')} again)"
            )
        raise CheckpointError(
            "the checkpoint's model differs from this run's: "
            + "; ".join(diffs)
            + hint
            + ". Use the same model flags, or --finetune to load only matching weights"
        )
    layout_keys = {"tensor_model_parallel_size"} if reshard else set()
    problems = [
        f"{flag} was {saved[key]!r}, now {getattr(cfg, key)!r} (pass {flag} {saved[key]}"
        + (f"; {_MUST_MATCH_HINTS[key]})" if key in _MUST_MATCH_HINTS else ")")
        for key, flag in _MUST_MATCH.items()
        if key in saved and key not in layout_keys and saved[key] != getattr(cfg, key)
    ]
    if (
        not reshard
        and saved.get("zero_stage") is not None
        and saved["zero_stage"] != cfg.zero_stage
        and not cfg.no_load_optim
    ):
        problems.append(
            f"--zero-stage was {saved['zero_stage']}, now {cfg.zero_stage} (optimizer states are laid out "
            "per stage: add --no-load-optim to start the optimizer afresh)"
        )
    saved_world = client_state.get("world_size")
    if (
        not reshard
        and saved_world not in (None, cfg.world_size)
        and not cfg.no_load_optim
        and cfg.zero_stage > 0
    ):
        problems.append(
            f"the checkpoint was written by {saved_world} processes and this run has {cfg.world_size}; "
            "ZeRO optimizer shards need the same data-parallel size (or add --no-load-optim)"
        )
    if problems:
        raise CheckpointError("cannot resume exactly from this checkpoint: " + "; ".join(problems))


def resumed_schedule(client_state: dict[str, Any], cfg: TrainConfig, iteration: int) -> Schedule:
    """The LR schedule a resumed run follows (Megatron's rule), with the log lines that say so: the
    checkpoint's (its recorded flags; the run's for a value it predates), or the flags' with
    ``--override-opt-param-scheduler``. ``--train-iters`` is the loop's length either way."""
    ours = Schedule.from_values(cfg.to_dict())
    if cfg.override_opt_param_scheduler:
        schedule = ours
        source = "from the flags (--override-opt-param-scheduler)"
    else:
        schedule = Schedule.from_values(client_state.get("args", {}), fallback=cfg.to_dict())
        source = "from the checkpoint"
    print_rank_0(
        f"> lr schedule: {source} ({schedule.describe()}); iteration {iteration + 1} runs at lr "
        f"{schedule.lr_at(iteration):.6g}"
    )
    if cfg.override_opt_param_scheduler:
        return schedule
    ignored = [
        f"{flag} {show_value(getattr(ours, key))}"
        for key, flag in SCHEDULE_FLAGS.items()
        if getattr(ours, key) != getattr(schedule, key)
    ]
    if ignored:
        print_rank_0(
            f"> not used: {', '.join(ignored)} (this run's flags; the checkpoint's schedule is kept: pass "
            "--override-opt-param-scheduler to take it from the flags)"
        )
    saved_iters = client_state.get("args", {}).get("train_iters")
    if saved_iters is not None and saved_iters != cfg.train_iters:
        print_rank_0(f"> --train-iters was {saved_iters}, now {cfg.train_iters}: {_extension(schedule, cfg)}")
    return schedule


def _extension(schedule: Schedule, cfg: TrainConfig) -> str:
    """How the iterations of a changed ``--train-iters`` are scheduled on the checkpoint's schedule."""
    end = max(schedule.lr_decay_iters, schedule.lr_warmup_iters)
    if schedule.lr_decay_style == "constant" or cfg.train_iters <= end:
        return f"the run ends at iteration {cfg.train_iters}, on the checkpoint's schedule"
    return (
        f"iterations {end + 1}-{cfg.train_iters} run past the checkpoint's --lr-decay-iters "
        f"{schedule.lr_decay_iters} at --min-lr {schedule.min_lr:.6g} (Megatron's rule; with "
        "--override-opt-param-scheduler they decay over the flags' --lr-decay-iters, default --train-iters)"
    )


def _resume_resharded(
    engine: Any,
    reader: CheckpointReader,
    client_state: dict[str, Any],
    cfg: TrainConfig,
    saved: dict[str, Any],
    now: dict[str, Any],
) -> None:
    """Resume on another layout: the fp32 masters, Adam's moments and step from ``optim_tpNN.pt`` (the
    module's weights follow from the masters), or with --no-load-optim the weights from the model files;
    then the LR scheduler's step and DeepSpeed's step counters from the engine state's client file (the
    caller sets the schedule, which sets the optimizer's LR for the next step)."""
    if cfg.no_load_optim:
        n = load_module_state(engine, merge_tp_shards(load_model_files(reader)))
        what = f"weights resharded ({n} tensors); --no-load-optim: the optimizer starts afresh"
    else:
        n, step = restore_optimizer_state(engine, load_optim_files(reader))
        what = f"optimizer state resharded ({n} tensors; step {step})"
    if engine.lr_scheduler is not None and "lr_scheduler" in client_state:
        engine.lr_scheduler.load_state_dict(client_state["lr_scheduler"])  # its step count
    engine.global_steps = client_state["global_steps"]
    engine.global_samples = client_state.get(
        "global_samples", engine.global_steps * engine.train_batch_size()
    )
    engine.skipped_steps = client_state["skipped_steps"]
    with_scheme = saved["scheme"] != now["scheme"] or now["scheme"] != "split-rank"
    old, new = describe_layout(saved, with_scheme), describe_layout(now, with_scheme)
    print_rank_0(f"> resuming a {old} checkpoint on {new}: {what}")


def load_checkpoint(
    engine: Any, cfg: TrainConfig, model_args: ModelArgs, reader: CheckpointReader
) -> tuple[int, int, list[dict[str, Any]]]:
    """Resume from ``reader``'s checkpoint (chosen and verified by ``select_checkpoint``): returns
    ``(iteration, consumed_samples, data_history)``. A changed ``--data-path``/``--split`` is refused
    before anything is loaded unless ``--allow-data-change``. On another layout (TP size or cut, ZeRO
    stage, data-parallel size) the optimizer state is resharded from ``optim_tpNN.pt``; the RNG states,
    which belong to the old ranks, are then not restored."""
    if not has_deepspeed_state(reader):
        raise CheckpointError(
            f"{reader.dir} holds no DeepSpeed state (mp_rank_XX_model_states.pt) to resume from; pass "
            "--finetune to load only its weights"
        )
    meta, saved_tp = peek_client_state(reader)
    saved, now = saved_layout(meta, saved_tp), current_layout(engine, cfg)
    reshard = check_reshardable(reader, saved, now)
    check_compatible(meta, cfg, model_args, reshard=reshard)
    history = resumed_data_history(meta, cfg, int(meta["iteration"]), int(meta["consumed_samples"]))
    schedule = resumed_schedule(meta, cfg, int(meta["iteration"]))
    if reshard:
        _resume_resharded(engine, reader, meta, cfg, saved, now)
        engine.lr_scheduler.set_schedule(schedule)
        return int(meta["iteration"]), int(meta["consumed_samples"]), history
    client_state = load_engine_state(engine, reader, load_optimizer_states=not cfg.no_load_optim)
    engine.lr_scheduler.set_schedule(schedule)  # after the load: the next step's lr is the schedule's
    if cfg.no_load_optim:
        print_rank_0(
            f"> --no-load-optim: Adam's state (moments and step counts) was not loaded from {reader.dir}; "
            "the optimizer starts afresh from the checkpoint's weights (the LR schedule continues)"
        )
    if not cfg.no_load_rng:
        load_rng_state(reader, _global_rank())
    return int(client_state["iteration"]), int(client_state["consumed_samples"]), history


def select_for_run(cfg: TrainConfig) -> Selection | None:
    """The checkpoint this run starts from (collective): ``select_checkpoint(--load)`` with its notes
    printed. Nothing is written here: skipped corrupt checkpoints are moved aside by
    ``move_skipped_aside`` once the resume's checks passed."""
    if not cfg.load:
        return None
    sel = select_checkpoint(cfg.load, finetune=cfg.finetune)
    if sel is None:
        print_rank_0(f"> no checkpoint in {cfg.load} yet: starting from scratch")
        return None
    for note in sel.notes:
        print_rank_0(f"> {note}")
    return sel


def move_skipped_aside(cfg: TrainConfig, sel: Selection | None) -> None:
    """When ``--save`` is the ``--load`` directory, rename the corrupt checkpoints the selection skipped
    (collective), so that no save reuses their names."""
    if sel is None or not sel.skipped or not cfg.save:
        return
    if os.path.realpath(cfg.save) != os.path.realpath(cfg.load):
        return
    _barrier()
    if _global_rank() == 0:
        for d in sel.skipped:
            print_rank_0(f"> moved the corrupt {d} aside to {move_aside(d)}")
    _barrier()


def lock_save_dir(cfg: TrainConfig) -> SaveDirLock | None:
    """Take the lock of ``--save`` on rank 0 for the life of the run (collective: every rank raises the
    same ``CheckpointError`` when another run holds it)."""
    if not cfg.save:
        return None
    lock, outcome = None, None
    if _global_rank() == 0:
        lock = SaveDirLock(cfg.save)
        try:
            note = lock.acquire()
            if note:
                print_rank_0(f"> {note}")
        except CheckpointError as e:
            outcome = str(e)
    outcome = next((o for o in _agree(outcome) if o), None)
    if outcome:
        raise CheckpointError(outcome)
    return lock


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
