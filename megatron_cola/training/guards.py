"""Run-time guards: the non-finite step guard, the exit-signal handler and the time limit.

Once per optimizer step, after the last micro-batch's backward and before its ``engine.step()``, every
rank puts four flags into one small tensor and the ranks take their maximum with one all-reduce:

====  ===========================================================================================
0     a micro-batch loss of this step is NaN/Inf on this rank (``--check-for-nan-in-loss-and-grad``)
1     this rank's gradients are not finite (only where DeepSpeed's optimizer does not check them)
2     the number of the signal (SIGTERM or SIGUSR1) that arrived (``--exit-signal-handler``), else 0
3     ``--exit-duration-in-mins`` has passed on this rank's clock
====  ===========================================================================================

That all-reduce is the only collective and the only host sync the guards add per step, and it runs only
when one of the three features is on. Its cost is one latency-bound all-reduce of 16 bytes and one
device-to-host copy per step (the host waits for the step's backward to finish; the optimizer step is
queued after the decision).

A step is skipped when flag 0 or 1 is set, or when DeepSpeed's own overflow check skipped it (the ZeRO
and bf16 optimizers compute the global grad norm over every rank, so the ranks agree): the weights,
the optimizer state and the LR schedule stay as they were. ZeRO-0 in fp32 uses the plain torch
optimizer, which has no such check: there the guard measures the gradients itself (flag 1) and holds
the step. After ``--max-consecutive-skipped-iters`` skipped steps in a row the run stops with a
``TrainingError``; while any skip is pending no checkpoint is written (the weights that produced a
non-finite loss may be non-finite themselves).
"""

from __future__ import annotations

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


class RunGuard:
    """The per-step flags, the skip counters and the exit decision of one run."""

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
        self.enabled = self.check_nan or signals is not None or cfg.exit_duration_in_mins is not None
        self.consecutive_skips = 0
        self.total_skips = 0
        self.window_skips = 0  # since the last log line
        self.exit_reason: str | None = None

    # ------------------------------------------------------------------------------------- per step
    def before_step(self, losses: list[torch.Tensor]) -> Verdict:
        """Agree on this step (one all-reduce); call after the last backward, before ``engine.step()``."""
        if not self.enabled:
            return Verdict()
        flags = torch.zeros(4, dtype=torch.float32, device=self.device)
        if self.check_nan:
            flags[0] = (~torch.isfinite(torch.stack(losses))).any().float()
        if self.own_grad_check:
            flags[1] = (~torch.isfinite(self._grad_norm())).float()
        received = self.signals.received if self.signals is not None else None
        host = [float(received or 0), float(self._time_is_up())]
        flags[2:] = torch.tensor(host, dtype=torch.float32).to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad, signum, time_up = flags.tolist()
        verdict = Verdict(skip=loss_bad > 0 or grad_bad > 0)
        if signum > 0:  # the highest signal number any rank received
            name = signal.Signals(int(signum)).name
            verdict.exit_reason = f"{name} received (--exit-signal-handler)"
        elif time_up > 0:
            verdict.exit_reason = f"--exit-duration-in-mins {self.cfg.exit_duration_in_mins} reached"
        if verdict.skip and self.own_grad_check:
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
        if verdict.skip and applied:
            print_rank_0(
                f"> WARNING: iteration {iteration} had a non-finite loss but finite gradients; "
                "DeepSpeed applied the step"
            )
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
