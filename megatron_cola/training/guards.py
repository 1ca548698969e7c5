"""Run-time guards: the non-finite step guard, the exit-signal handler and the time limit.

Once per optimizer step, after the last micro-batch's backward and before its ``engine.step()``, the
guard decides two things, and the ranks must agree on both:

- **skip this step?** (``--check-for-nan-in-loss-and-grad``) A step is skipped when a loss or the
  gradients are not finite. Where DeepSpeed's optimizer checks for overflow itself (the ZeRO and bf16
  optimizers compute the global grad norm over every rank, so the ranks agree), DeepSpeed decides and
  the guard adds nothing to the step: no device work, no host read. A non-finite loss of a step that
  DeepSpeed applied anyway (finite gradients) is reported when the step is logged, from the
  data-parallel mean loss the log reads anyway (non-finite when any rank's was). ZeRO-0 in fp32 steps
  the plain torch optimizer, which has no such check: there ``guard_optimizer`` hands DeepSpeed a
  ``GuardedOptimizer`` (a ``torch.optim.Optimizer`` of ours around AdamW) and the guard measures the
  loss and gradients itself; it must know the answer on the host before the step (one device-to-host
  read) and tells the wrapper to hold that one step.
- **stop after this step?** A signal (SIGTERM/SIGUSR1, ``--exit-signal-handler``) or
  ``--exit-duration-in-mins`` on this rank's clock. These are host facts: one rank reads them directly;
  several ranks take their maximum with one all-reduce of a small CPU tensor over a gloo group (the
  default group under gloo, a gloo group beside NCCL), so the device is never waited for.

Per step, then: one rank needs no collective and no host read (unless it is the ZeRO-0 fp32 path);
several ranks need one CPU all-reduce when a stop feature is on (the exit-signal handler is
on by default), carrying the ZeRO-0 fp32 skip flag too (12 bytes). ``tests/test_guards.py`` counts them.

A skipped step keeps the weights, the optimizer state and the LR schedule as they were; whether it was
applied is read from DeepSpeed's public ``engine.was_step_applied()``. After
``--max-consecutive-skipped-iters`` skipped steps in a row the run stops with a ``TrainingError``; while
any skip is pending no checkpoint is written (the weights that produced a non-finite loss may be
non-finite themselves).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from megatron_cola.errors import TrainingError
from megatron_cola.training.logging_utils import print_rank_0
from megatron_cola.training.train_config import TrainConfig

#: The signals ``--exit-signal-handler`` turns into "save at the next step boundary and exit 0".
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    """Records SIGTERM/SIGUSR1 instead of dying; ``restore()`` puts the previous handlers back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = EXIT_SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            print(f"> received {self.received.name}: saving at the next step boundary", flush=True)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


@dataclass
class Verdict:
    """The ranks' agreed decision for one step."""

    skip: bool = False
    exit_reason: str | None = None


def _host_group() -> Any:
    """A gloo group for agreeing on host flags: the default group under gloo, else a new one (every rank
    calls this at the same point)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class GuardedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose next ``step`` the guard can hold: the one DeepSpeed steps on the ZeRO-0
    fp32 path, where it uses the client optimizer as it is.

    It wraps ``optimizer`` (which keeps its parameter groups and state: ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's own objects, and ``state_dict`` is its state dict, so
    checkpoints are the same files and the LR schedule, built on the wrapped optimizer, drives the same
    groups). After ``hold_next_step()`` the next ``step`` leaves the weights and the moments alone and
    sets ``overflow``: the attribute DeepSpeed's engine reads from whichever optimizer it steps (its own
    ZeRO and bf16 optimizers set it the same way) to count the skip, hold the LR schedule and answer
    ``engine.was_step_applied()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # Not Optimizer.__init__: that would copy the parameter groups instead of sharing them.
        self.optimizer = optimizer
        self.overflow = False  # whether the last step was held
        self._hold = False

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def hold_next_step(self) -> None:
        """Make the next ``step`` a no-op that reports itself as skipped."""
        self._hold = True

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        held, self._hold = self._hold, False
        self.overflow = held
        return None if held else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"GuardedOptimizer({self.optimizer!r})"


def guard_optimizer(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """What to hand ``deepspeed.initialize``: ``optimizer`` wrapped in a ``GuardedOptimizer`` where the
    guard must decide skips itself (the NaN check on, ZeRO-0 in fp32: DeepSpeed steps the client
    optimizer as it is); ``optimizer`` itself where DeepSpeed wraps it in a ZeRO or bf16 optimizer with
    its own overflow check (which accepts only the optimizer types it has tested)."""
    if cfg.check_for_nan_in_loss_and_grad and cfg.zero_stage == 0 and not cfg.bf16:
        return GuardedOptimizer(optimizer)
    return optimizer


class RunGuard:
    """The per-step decisions of one run: skip (and the run of consecutive skips), stop."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine: Any,
        device: torch.device,
        signals: ExitSignalHandler | None,
        start_time: float,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.device = device
        self.signals = signals
        self.start_time = start_time
        self.check_nan = cfg.check_for_nan_in_loss_and_grad
        # ZeRO-0 fp32 (``guard_optimizer``): the guard decides; elsewhere DeepSpeed's optimizer does.
        guarded = engine.optimizer if isinstance(engine.optimizer, GuardedOptimizer) else None
        self.optimizer: GuardedOptimizer | None = guarded if self.check_nan else None
        if self.check_nan and self.optimizer is None and not hasattr(engine.optimizer, "overflow"):
            raise RuntimeError(  # a bug: guard_optimizer did not foresee how DeepSpeed wraps the optimizer
                f"DeepSpeed steps {type(engine.optimizer).__name__}, which has no overflow check, and the "
                "guard cannot hold its steps (build the engine with guard_optimizer)"
            )
        stop_features = signals is not None or cfg.exit_duration_in_mins is not None
        world = dist.get_world_size() if dist.is_initialized() else 1
        # The one collective per step: only where several ranks have something to agree on.
        self.agree = world > 1 and (stop_features or self.optimizer is not None)
        self.group = _host_group() if self.agree else None
        self.consecutive_skips = 0
        self.exit_reason: str | None = None
        self._applied: set[int] = set()  # iterations applied since the last log (non-finite loss check)

    # ------------------------------------------------------------------------------------- per step
    def before_step(self, losses: list[torch.Tensor]) -> Verdict:
        """Agree on this step; call after the last backward, before ``engine.step()``. Reads the device
        only on the ZeRO-0 fp32 path and runs a collective only when several ranks must agree."""
        bad = 0.0
        if self.optimizer is not None:  # its step is held below: the host needs the answer now
            loss_bad = ~torch.isfinite(torch.stack(losses)).all()
            bad = float((loss_bad | ~torch.isfinite(self._grad_norm())).item())
        received = self.signals.received if self.signals is not None else None
        flags = [bad, float(received or 0), float(self._time_is_up())]
        if self.agree:
            agreed = torch.tensor(flags, dtype=torch.float32)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)
            flags = agreed.tolist()  # a CPU tensor: no device sync
        bad, signum, time_up = flags
        verdict = Verdict(skip=bad > 0)
        if signum > 0:  # the highest signal number any rank received
            name = signal.Signals(int(signum)).name
            verdict.exit_reason = f"{name} received (--exit-signal-handler)"
        elif time_up > 0:
            verdict.exit_reason = f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins} reached"
        if verdict.skip and self.optimizer is not None:
            # DeepSpeed still clips and zeroes the gradients; the optimizer leaves the weights and
            # moments alone and reports the skip, so DeepSpeed counts it and holds the LR schedule.
            self.optimizer.hold_next_step()
        return verdict

    def after_step(self, verdict: Verdict, iteration: int) -> bool:
        """Take in the step just run; returns whether it was skipped (``engine.was_step_applied()``)."""
        applied = self.engine.was_step_applied()
        if verdict.exit_reason and self.exit_reason is None:
            self.exit_reason = verdict.exit_reason
        if applied:
            if self.check_nan:
                self._applied.add(iteration)
            self.consecutive_skips = 0
            return False
        self.consecutive_skips += 1
        return True

    def check_skip_limit(self, iteration: int, total_skips: int) -> None:
        """After a skipped step: say so, and raise ``TrainingError`` after
        ``--max-consecutive-skipped-iters`` in a row. ``total_skips``: this launch's, the metrics' count."""
        print_rank_0(
            f"> iteration {iteration}: non-finite loss or gradient norm, optimizer step skipped "
            f"({self.consecutive_skips} in a row, {total_skips} in total)"
        )
        limit = self.cfg.max_consecutive_skipped_iters
        if self.check_nan and self.consecutive_skips >= limit:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive iterations (up to {iteration}) had a non-finite "
                f"loss or gradient norm (--max-consecutive-skipped-iters {limit}); stopping without "
                "saving. Lower --lr, raise --lr-warmup-iters or set --clip-grad, and resume from the "
                "last checkpoint"
            )

    def check_logged(self, records: list[dict[str, Any]]) -> None:
        """Warn about applied steps whose logged (data-parallel mean) loss is not finite: DeepSpeed saw
        finite gradients and applied them. Call with the ``train`` records ``TrainingMetrics.flush``
        returns."""
        for record in records:
            iteration, loss = record["iteration"], record["lm_loss"]
            if iteration in self._applied and not math.isfinite(loss):
                print_rank_0(
                    f"> WARNING: iteration {iteration} had a non-finite loss but finite gradients; "
                    "DeepSpeed applied the step"
                )
        self._applied.clear()

    @property
    def save_allowed(self) -> bool:
        """False while the latest step was skipped: its weights may be the ones that went non-finite."""
        return self.consecutive_skips == 0

    # ------------------------------------------------------------------------------------- helpers
    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)

    def _time_is_up(self) -> bool:
        limit = self.cfg.exit_duration_in_mins
        return limit is not None and (time.time() - self.start_time) / 60.0 > limit
