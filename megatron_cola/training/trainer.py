"""``Trainer``: one pre-training run on a DeepSpeed engine, laid out like Megatron's ``train()``.

``setup`` builds the model (seeded, TP-sharded), optimizer, schedule and engine, resumes or loads
weights, and builds the data; ``train_step`` runs one global batch; ``evaluate`` averages the loss over
``--eval-iters`` batches; ``save`` writes a checkpoint; ``run`` is the loop. Every metric goes through
one ``TrainingMetrics`` (``training/metrics.py``): between log intervals the losses and grad norms stay
on the device, and the host waits for the device only when a line is printed, an evaluation runs or a
checkpoint is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_cola.checkpoint.lock import SaveDirLock
from megatron_cola.checkpoint.weights import adopt_architecture, load_weights_only
from megatron_cola.config import ModelArgs
from megatron_cola.data import check_dataset_files
from megatron_cola.data.tokenizers import AbstractTokenizer
from megatron_cola.errors import ConfigError
from megatron_cola.model.sharding import sharding_plan
from megatron_cola.parallel import ParallelState
from megatron_cola.training import checkpointing
from megatron_cola.training.data_setup import (
    build_datasets,
    describe_datasets,
    make_loader,
    tokens_and_labels,
)
from megatron_cola.training.ds_config import build_ds_config, save_ds_config
from megatron_cola.training.engine import build_engine, build_parallel_model, compile_mode_of, optimizer_name
from megatron_cola.training.guards import ExitSignalHandler, RunGuard, Verdict
from megatron_cola.training.logging_utils import print_rank_0
from megatron_cola.training.metrics import TrainingMetrics
from megatron_cola.training.train_config import SHAPE_OVERRIDES, TrainConfig, format_flags
from megatron_cola.training.watchdog import Watchdog, gather_peers


class Trainer:
    """One pre-training run. ``Trainer(cfg, model_args, tokenizer, device).run()`` returns its history."""

    def __init__(
        self, cfg: TrainConfig, model_args: ModelArgs, tokenizer: AbstractTokenizer, device: torch.device
    ) -> None:
        self.cfg = cfg
        self.model_args = model_args
        self.tokenizer = tokenizer
        self.device = device
        self.iteration = 0
        self.consumed_samples = 0
        self.history: dict[str, Any] = {"train": [], "valid": [], "test": None}
        self.start_time = time.time()  # for --exit-duration-in-mins
        self.signals: ExitSignalHandler | None = None
        self.watchdog: Watchdog | None = None
        self.data_history = checkpointing.initial_data_history(cfg)  # --data-path/--split per stretch
        self.lock: SaveDirLock | None = None  # of --save, for the life of the run
        self.saves = checkpointing.AsyncSaves(cfg.keep_last_checkpoints) if cfg.async_save else None
        self.last_save_time = time.time()  # for --save-interval-minutes (rank 0's clock decides)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if dist.get_world_size() != cfg.world_size:
            raise ConfigError(f"launcher world size {dist.get_world_size()} != expected {cfg.world_size}")
        self.parallel = ParallelState.from_torch_distributed(
            cfg.tensor_model_parallel_size, timeout=timedelta(minutes=cfg.distributed_timeout_minutes)
        )
        self._start_watchdog()
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        print_rank_0(self._banner())
        self.lock = checkpointing.lock_save_dir(cfg)  # before anything reads or writes --save
        start = time.time()
        self._build_engine()
        engine_seconds = time.time() - start
        self.history["start_iteration"] = self.iteration
        start = time.time()
        self.train_ds, self.valid_ds, self.test_ds = build_datasets(
            cfg, self.tokenizer.vocab_size, self.tokenizer.eod
        )
        for line in describe_datasets(self.train_ds, self.valid_ds, self.test_ds):
            print_rank_0(line)
        self.train_iter = None
        if self.iteration < cfg.train_iters:
            self.train_iter = iter(make_loader(cfg, self.train_ds, self.consumed_samples, self.parallel))
        data_seconds = time.time() - start
        self.metrics = TrainingMetrics.for_run(
            cfg, self.model_args, self.parallel, self.device, self.optimizer_name
        )
        self.guard = RunGuard(cfg, self.engine, self.device, self.signals, self.start_time)
        self.split_dims = self._split_dims()
        print_rank_0(
            f"> time to initialize (seconds): {time.time() - self.start_time:.3f} (model, optimizer and "
            f"engine: {engine_seconds:.3f}, datasets: {data_seconds:.3f})"
        )

    def _start_watchdog(self) -> None:
        """The hang watchdog (``training/watchdog.py``): one gather of hosts and pids, then a thread."""
        cfg = self.cfg
        peers, run_id = gather_peers(self.start_time)
        self.watchdog = Watchdog(
            dist.get_rank(),
            peers,
            run_id,
            cfg.save,
            cfg.hang_timeout_minutes,
            cfg.distributed_timeout_minutes,
        )
        self.watchdog.start()

    def _long_phase(self, name: str) -> Any:
        """A save or an evaluation, for the watchdog's timeout."""
        return self.watchdog.long_phase(name) if self.watchdog is not None else contextlib.nullcontext()

    def _banner(self) -> str:
        cfg, p = self.cfg, self.parallel
        # Name what runs: the size, and the flags that change its shapes (the count is the real one).
        shape = {
            k: v for k, v in dataclasses.asdict(cfg.model).items() if k in SHAPE_OVERRIDES and v is not None
        }
        overrides = f"overrides: {format_flags(shape)}; " if shape else ""
        return (
            f"> Megatron-CoLA: {cfg.model_size} {'full rank' if self.model_args.full_rank else 'CoLA'} "
            f"({overrides}{self.model_args.num_params() / 1e6:.1f}M params), world {cfg.world_size} = "
            f"TP {p.tp_size} x DP {p.dp_size}, ZeRO-{cfg.zero_stage}, "
            f"{'bf16' if cfg.bf16 else 'fp32'}, recompute={cfg.recompute}, device={self.device.type}, "
            f"global batch {cfg.global_batch_size} = {cfg.micro_batch_size} x {p.dp_size} x "
            f"{cfg.gradient_accumulation_steps}"
        )

    def _build_engine(self) -> None:
        """Model (weights-only load when asked), optimizer, schedule, engine; then a full resume."""
        cfg = self.cfg
        sel = checkpointing.select_for_run(cfg)  # never a silent restart: fallback with a note, or an error
        reader = sel.reader if sel is not None else None
        weights_only = sel is not None and (cfg.finetune or sel.weights_only)
        checkpointing.check_save_dir(cfg, None if cfg.finetune else reader)
        if weights_only:
            # Weights from elsewhere (an HF import, another layout): their architecture details win over
            # the size's defaults (e.g. a Llama-2 import's rms_norm_eps, a Llama-3 import's rope_theta).
            self.model_args, adopted = adopt_architecture(self.model_args, cfg.load, reader.iteration)
            if adopted:
                print_rank_0(f"> from the checkpoint: {adopted}")
        ds_config = build_ds_config(cfg, self.device.type)  # the one DeepSpeed config of the run
        # ZeRO-3 partitions the model as it is built (a weights-only load needs it whole first).
        zero3 = ds_config if cfg.zero_stage == 3 and not weights_only else None
        model = build_parallel_model(
            cfg.seed,
            self.model_args,
            self.parallel,
            self.device,
            zero3_config=zero3,
            scheme=cfg.cola_tp_scheme,
            compile_mode=compile_mode_of(cfg),
        )
        if self.parallel.tp_size > 1:
            scheme = sharding_plan(model).scheme
            print_rank_0(f"> tensor parallelism: {scheme} scheme, TP={self.parallel.tp_size}")
        if weights_only:
            load_weights_only(
                model, cfg.load, reader.iteration, seed=cfg.seed, init_std=self.model_args.init_std
            )
            print_rank_0(f"> loaded weights only from {reader.dir}; starting at iteration 0")
        self.engine, self.scheduler = build_engine(cfg, model, self.parallel, self.device, ds_config)
        self.optimizer_name = optimizer_name(self.scheduler.optimizer)  # the one that runs (not DS's wrapper)
        self.history["optimizer"] = self.optimizer_name
        if reader is not None and not weights_only:
            self.iteration, self.consumed_samples, self.data_history = checkpointing.load_checkpoint(
                self.engine, cfg, self.model_args, reader
            )
            print_rank_0(f"> resumed from {reader.dir} at iteration {self.iteration}")
        # Only now, with every check passed, is anything written into --save.
        checkpointing.move_skipped_aside(cfg, sel)
        if cfg.save and dist.get_rank() == 0:
            save_ds_config(ds_config, cfg.save)

    def _split_dims(self) -> dict[str, int]:
        if self.parallel.tp_size == 1:
            return {}
        from megatron_cola.parallel import tp_split_dims

        return tp_split_dims(self.engine.module)

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self) -> None:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches. The guards add no host
        sync (only the ZeRO-0 fp32 path reads one flag) and at most one CPU all-reduce
        (``training/guards.py``)."""
        losses = []
        verdict = Verdict()
        n = self.cfg.gradient_accumulation_steps
        for micro in range(n):
            tokens, labels = tokens_and_labels(next(self.train_iter), self.device)
            if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last pass's CUDA-graph outputs are free
            loss = self.engine(tokens, labels)
            self.engine.backward(loss)
            losses.append(loss.detach().float())
            if micro == n - 1:
                verdict = self.guard.before_step(losses)
            self.engine.step()
        self.iteration += 1
        skipped = self.guard.after_step(verdict, self.iteration)
        self.consumed_samples += self.cfg.global_batch_size
        self.metrics.record_step(
            self.iteration,
            self.consumed_samples * self.cfg.seq_length,
            torch.stack(losses).mean(),
            self.scheduler.get_last_lr()[0],
            self.engine.get_global_grad_norm(),
            skipped=skipped,
        )
        if skipped:  # says so; raises after --max-consecutive-skipped-iters in a row
            self.guard.check_skip_limit(self.iteration, self.metrics.total_skips)
        if self.watchdog is not None:
            self.watchdog.beat(self.iteration)

    def _flush_steps(self) -> None:
        records = self.metrics.flush()
        self.guard.check_logged(records)
        self.history["train"] += [(r["iteration"], r["lm_loss"]) for r in records]

    @torch.no_grad()
    def evaluate(self, dataset: Any) -> float:
        """Mean loss over ``eval_iters`` global batches (the same batches at every evaluation)."""
        self.engine.eval()
        it = iter(make_loader(self.cfg, dataset, 0, self.parallel))
        losses = []
        for _ in range(self.cfg.eval_iters * self.cfg.gradient_accumulation_steps):
            tokens, labels = tokens_and_labels(next(it), self.device)
            losses.append(self.engine(tokens, labels).float())
        self.engine.train()
        value = torch.stack(losses).mean().detach().clone()
        if self.parallel.dp_size > 1:
            dist.all_reduce(value, group=self.parallel.dp_group)
            value /= self.parallel.dp_size
        return float(value)

    def _evaluate_and_log(self, name: str, dataset: Any) -> float:
        self._flush_steps()
        with self._long_phase(f"{name} evaluation"):
            loss = self.evaluate(dataset)
        tokens = self.consumed_samples * self.cfg.seq_length
        self.metrics.log_evaluation(name, self.iteration, tokens, loss)
        return loss

    def save(self) -> str:
        """Write a checkpoint of the current iteration into ``--save`` (with ``--async-save``: snapshot it
        and let the background writer finish it)."""
        self._flush_steps()
        start = time.perf_counter()
        tokenizer_model = os.path.abspath(self.cfg.tokenizer_model) if self.cfg.tokenizer_model else None
        if self.watchdog is not None:  # a save is a long phase for the hang watchdog (ended on return)
            self.watchdog.enter_phase(f"saving iteration {self.iteration}")
        path = checkpointing.save_checkpoint(
            self.engine,
            self.cfg,
            self.model_args,
            self.parallel,
            iteration=self.iteration,
            consumed_samples=self.consumed_samples,
            tokenizer_info={
                "type": self.cfg.tokenizer_type,
                "model": tokenizer_model,
                "vocab_size": self.cfg.vocab_size,
            },
            vocab_size=self.tokenizer.vocab_size,
            split_dims=self.split_dims,
            data_history=self.data_history,
            saves=self.saves,
            tp_scheme=sharding_plan(self.engine.module).scheme,
        )
        if self.watchdog is not None:
            self.watchdog.leave_phase()
        self.last_save_time = time.time()
        if self.saves is None:
            print_rank_0(f"> saved checkpoint {path}")
        else:
            print_rank_0(
                f"> saving checkpoint {path} in the background (training paused "
                f"{time.perf_counter() - start:.2f} s)"
            )
        return path

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        """Train to ``--train-iters`` (or an exit condition); returns the loss history."""
        if self.cfg.exit_signal_handler:
            self.signals = ExitSignalHandler()
        finished = False
        try:
            self.setup()
            self._loop()
            if self.saves is not None:  # exits (signals, time limit) too: the pending save first
                if self.watchdog is not None:  # a long wait is not a hang
                    self.watchdog.enter_phase("waiting for the background save")
                waited = self.saves.wait()
                if self.watchdog is not None:
                    self.watchdog.leave_phase()
                if waited > 0.01:
                    print_rank_0(f"> waited {waited:.2f} s for the background save to finish")
            finished = True
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if self.saves is not None and not finished:
                self.saves.close()
            if self.signals is not None:
                self.signals.restore()
            if self.lock is not None:
                self.lock.release()
        self._flush_steps()
        if self.iteration >= self.cfg.train_iters:
            self._final_evaluations()
        self.metrics.close()
        self.history["iteration"] = self.iteration
        self.history["skipped_iterations"] = self.metrics.total_skips
        self.history["exit_reason"] = self.guard.exit_reason
        return self.history

    def _loop(self) -> None:
        cfg, metrics = self.cfg, self.metrics
        first = self.iteration + 1  # this launch's first iteration is logged at once
        metrics.start(self.iteration)
        while self.iteration < cfg.train_iters:
            self.train_step()
            if self.saves is not None:
                self.saves.poll()  # a background save that failed stops the run here
            it = self.iteration
            time_to_save = False
            if it % cfg.log_interval == 0 or it == cfg.train_iters or it == first:
                self._flush_steps()
                metrics.log(it, self.consumed_samples, self.scheduler.get_last_lr()[0])
                # A .bin/.idx truncated or rewritten under the run: a DataError naming it (two fstat each).
                check_dataset_files(self.train_ds, self.valid_ds, self.test_ds)
                time_to_save = self._minutes_since_save_due()
            if self.valid_ds is not None and cfg.eval_iters > 0 and it % cfg.eval_interval == 0:
                with metrics.paused():  # evaluation is not training time
                    self.history["valid"].append((it, self._evaluate_and_log("validation", self.valid_ds)))
            stop = self._exit_reason()
            if self._save_due(stop is not None, time_to_save):
                with metrics.paused():  # nor is saving
                    self.save()
            if stop:
                print_rank_0(f"> exiting after iteration {it} ({stop})")
                break

    def _exit_reason(self) -> str | None:
        """Why the loop stops after this iteration (a signal, the time limit, ``--exit-interval``)."""
        if self.guard.exit_reason:
            return self.guard.exit_reason
        if self.cfg.exit_interval is not None and self.iteration % self.cfg.exit_interval == 0:
            return f"--exit-interval {self.cfg.exit_interval}"
        return None

    def _minutes_since_save_due(self) -> bool:
        """``--save-interval-minutes``: whether rank 0's clock says a save is due. Asked at log intervals
        only, where the ranks are together anyway: one broadcast of one number, no per-step collective."""
        minutes = self.cfg.save_interval_minutes
        if minutes is None:
            return False
        due = torch.tensor([float(time.time() - self.last_save_time >= 60.0 * minutes)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(due, src=0)
        return bool(due.item())

    def _save_due(self, stop: bool, time_to_save: bool = False) -> bool:
        """Every ``--save-interval``, when ``--save-interval-minutes`` passed (``time_to_save``), before an
        exit, and at the last iteration; never while the latest step was skipped as non-finite (its
        weights may be the ones that went bad)."""
        cfg, it = self.cfg, self.iteration
        if not cfg.save:
            return False
        due = bool(cfg.save_interval and it % cfg.save_interval == 0) or stop or it == cfg.train_iters
        due = due or time_to_save
        if due and not self.guard.save_allowed:
            print_rank_0(
                f"> not saving at iteration {it}: the last {self.guard.consecutive_skips} step(s) were "
                "skipped as non-finite; the previous checkpoint stays the latest"
            )
            return False
        return due

    def _final_evaluations(self) -> None:
        """Validation at the last iteration (unless the loop just did it) and the test split."""
        if self.cfg.eval_iters == 0:
            return
        valid = self.history["valid"]
        if self.valid_ds is not None and (not valid or valid[-1][0] != self.iteration):
            valid.append((self.iteration, self._evaluate_and_log("validation", self.valid_ds)))
        if self.test_ds is not None:
            self.history["test"] = self._evaluate_and_log("test", self.test_ds)
