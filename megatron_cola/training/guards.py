"""Run-time guards: the non-finite step guard, the exit-signal handler and the time limit.

Once per optimizer step, after the last micro-batch's backward and before its ``engine.step()``, the
guard decides two things, and the ranks must agree on both:

- **skip this step?** (``--check-for-nan-in-loss-and-grad``) A step is skipped when a loss or the
  gradients are not finite. Where DeepSpeed's optimizer checks for overflow itself (the ZeRO and bf16
  optimizers compute the global grad norm over every rank, so the ranks agree), DeepSpeed decides and
  the guard adds nothing to the step: no device work, no host read. A non-finite loss of a step that
  DeepSpeed applied anyway (finite gradients) is reported when the step is logged, from the
  data-parallel mean loss the log reads anyway (non-finite when any rank's was). ZeRO-0 in fp32 uses the
  plain torch optimizer, which has no such check: there the guard measures the loss and gradients itself
  and must know the answer on the host before the step (one device-to-host read; the step is held).
- **stop after this step?** A signal (SIGTERM/SIGUSR1, ``--exit-signal-handler``) or
  ``--exit-duration-in-mins`` on this rank's clock. These are host facts: one rank reads them directly;
  several ranks take their maximum with one all-reduce of a small CPU tensor over a gloo group (the
  default group under gloo, a gloo group beside NCCL), so the device is never waited for.

Per step, then: one rank needs no collective and no host read (unless it is the ZeRO-0 fp32 path);
several ranks need one CPU all-reduce when a stop feature is on (the exit-signal handler is
on by default), carrying the ZeRO-0 fp32 skip flag too (12 bytes). ``tests/test_guards.py`` counts them.

A skipped step keeps the weights, the optimizer state and the LR schedule as they were. After
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


def _no_step(*args: Any, **kwargs: Any) -> None:
    """Stands in for the plain torch optimizer's ``step`` during a skipped step."""


@dataclass
class Verdict:
    """The ranks' agreed decision for one step."""

    skip: bool = False
    exit_reason: str | None = None


def _host_group() -> Any:
    """A gloo group for agreeing on host flags: the default group under gloo, else a new one (every rank
    calls this at the same point)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class RunGuard:
    """The per-step decisions, the skip counters and the exit decision of one run."""

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
        # The plain torch optimizer (ZeRO-0, fp32) has no overflow check of its own: DeepSpeed's engine
        # skips a step (and holds the LR schedule) when ``optimizer.overflow`` is true, so we own that flag.
        self.own_grad_check = self.check_nan and not hasattr(engine.optimizer, "overflow")
        if self.own_grad_check:
            engine.optimizer.overflow = False
        stop_features = signals is not None or cfg.exit_duration_in_mins is not None
        world = dist.get_world_size() if dist.is_initialized() else 1
        # The one collective per step: only where several ranks have something to agree on.
        self.agree = world > 1 and (stop_features or self.own_grad_check)
        self.group = _host_group() if self.agree else None
        self.consecutive_skips = 0
        self.total_skips = 0
        self.window_skips = 0  # since the last log line
        self.exit_reason: str | None = None
        self._applied: set[int] = set()  # iterations applied since the last log (non-finite loss check)

    # ------------------------------------------------------------------------------------- per step
    def before_step(self, losses: list[torch.Tensor]) -> Verdict:
        """Agree on this step; call after the last backward, before ``engine.step()``. Reads the device
        only on the ZeRO-0 fp32 path and runs a collective only when several ranks must agree."""
        bad = 0.0
        if self.own_grad_check:  # the plain optimizer's step is held below: the host needs the answer now
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
        if verdict.skip:
            # Hold this one step: DeepSpeed still clips and zeroes the gradients, the optimizer's step
            # is a no-op, and ``overflow`` makes DeepSpeed count the skip and hold the LR schedule.
            self.engine.optimizer.step = _no_step
            self.engine.optimizer.overflow = True
        return verdict

    def after_step(self, verdict: Verdict, iteration: int) -> bool:
        """Count the step; returns whether it was skipped. Raises ``TrainingError`` after too many."""
        if self.own_grad_check:
            self.engine.optimizer.overflow = False
            self.engine.optimizer.__dict__.pop("step", None)  # the optimizer's own step again
        applied = self.engine.was_step_applied()
        if applied and self.check_nan:
            self._applied.add(iteration)
        skipped = not applied
        if verdict.exit_reason and self.exit_reason is None:
            self.exit_reason = verdict.exit_reason
        if not skipped:
            self.consecutive_skips = 0
            return False
        self.consecutive_skips += 1
        self.total_skips += 1
        self.window_skips += 1
        print_rank_0(
            f"> iteration {iteration}: non-finite loss or gradient norm, optimizer step skipped "
            f"({self.consecutive_skips} in a row, {self.total_skips} in total)"
        )
        limit = self.cfg.max_consecutive_skipped_iters
        if self.check_nan and self.consecutive_skips >= limit:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive iterations (up to {iteration}) had a non-finite "
                f"loss or gradient norm (--max-consecutive-skipped-iters {limit}); stopping without "
                "saving. Lower --lr, raise --lr-warmup-iters or set --clip-grad, and resume from the "
                "last checkpoint"
            )
        return True

    def check_logged(self, logged: list[tuple[int, float]]) -> None:
        """Warn about applied steps whose logged (data-parallel mean) loss is not finite: DeepSpeed saw
        finite gradients and applied them. Call with what ``StepLog.flush`` returns."""
        for iteration, loss in logged:
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

    def take_window_skips(self) -> int:
        """Skipped steps since the last call (for the log line)."""
        n, self.window_skips = self.window_skips, 0
        return n

    # ------------------------------------------------------------------------------------- helpers
    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)

    def _time_is_up(self) -> bool:
        limit = self.cfg.exit_duration_in_mins
        return limit is not None and (time.time() - self.start_time) / 60.0 > limit
