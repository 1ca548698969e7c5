"""Activation recomputation (whole-block checkpointing and CoLA-M) and the A projections it keeps.

CoLA-M keeps, per block, the residual stream entering each half-block (2 tensors of width d) and the
outputs of the A projections (7 rank-r tensors; 4 when q/k/v and gate/up are grouped), and recomputes
everything else in backward, without redoing the A GEMMs.

How: each half-block runs under a non-reentrant ``torch.utils.checkpoint`` (which stores only the
region's inputs and re-runs the region in backward to rebuild whatever backward needs). The region's
function is wrapped in a ``ColaMRegion``, an object that holds the A outputs the region keeps. Layers
built for CoLA-M (``keep=True``) run their A projection through ``rank_projection(..., keep=True)``, an
autograd function that saves its *input and weight* (as ``F.linear`` would) and whose output is
appended to the active region's list on the first (forward) run. When the checkpoint re-runs the region
in backward, the same call returns the kept output instead of multiplying: the GEMM is not redone, and
its backward (which needs only input and weight) is unchanged. Backward thus redoes only the B
projections, attention and the elementwise work. The kept outputs are matched by call order, so this is
indifferent to collectives or ZeRO-3 parameter gathering inside the region.

No module-level list: the active region lives in a ``contextvars.ContextVar``, set by the region object
itself each time it runs. The checkpoint calls that object again for recomputation, on whatever thread
autograd runs backward on, so the region is carried to that thread rather than looked up in shared
state. The kept-projection function is opaque to ``torch.compile`` (a clean graph break), so its
bookkeeping runs eagerly also inside compiled code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_cola.config import RECOMPUTE_CHOICES

Collective = Callable[[torch.Tensor], torch.Tensor]

A_GEMM_RANGE = "cola_m.kept_a_gemm"
"""Profiler range around each GEMM of a kept (CoLA-M) A projection."""

# The region running on this thread / context (None outside CoLA-M regions), and where kept tensors are
# also reported for measurement. Set and reset only by ``ColaMRegion.__call__`` / ``record_kept_tensors``.
_ACTIVE_REGION: contextvars.ContextVar[ColaMRegion | None] = contextvars.ContextVar(
    "cola_m_region", default=None
)
_RECORDER: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "cola_m_recorder", default=None
)


class ColaMRegion:
    """A checkpointed function plus the A outputs it keeps; the first call records, later calls replay."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.kept: list[torch.Tensor] = []
        self.calls = 0
        self.cursor = 0
        self.recorder = _RECORDER.get()  # captured where the region is created (the forward thread)

    @property
    def replaying(self) -> bool:
        return self.calls > 1

    def keep(self, out: torch.Tensor) -> None:
        self.kept.append(out.detach())
        if self.recorder is not None:
            self.recorder.append(self.kept[-1])

    def next_kept(self) -> torch.Tensor:
        out = self.kept[self.cursor]
        self.cursor += 1
        return out.detach()  # a fresh alias: autograd attaches this call's graph to it, not to the kept one

    def __call__(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        self.cursor = 0
        token = _ACTIVE_REGION.set(self)
        try:
            return self.fn(*args)
        finally:
            _ACTIVE_REGION.reset(token)


def _cat(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return weights[0] if len(weights) == 1 else torch.cat(tuple(weights), dim=0)


def _grouped_backward(
    ctx: Any, x: torch.Tensor, weights: Sequence[torch.Tensor], grad: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of ``x @ cat(weights)^T``: one GEMM for all weight gradients; the input gradient
    summed over the members last-first, the order autograd sums separate layers' contributions, so a
    grouped projection is bitwise equal to separate ones in fp32."""
    g = grad.to(dtype)
    sizes = [w.shape[0] for w in weights]
    grad_x = None
    if ctx.needs_input_grad[0]:
        parts = g.split(sizes, dim=-1)
        for part, w in zip(reversed(parts), reversed(weights)):
            term = (part @ w.to(dtype)).to(x.dtype)  # each member's term cast back, as autocast does
            grad_x = term if grad_x is None else grad_x + term
    grad_ws: list[torch.Tensor | None] = [None] * len(weights)
    if any(ctx.needs_input_grad[ctx.first_weight :]):
        gw = g.reshape(-1, g.shape[-1]).T @ x.to(dtype).reshape(-1, x.shape[-1])  # (sum r, d_in)
        grad_ws = [p.to(w.dtype) for p, w in zip(gw.split(sizes, dim=0), weights)]
    return grad_x, grad_ws


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else None


class _GroupedLinear(torch.autograd.Function):
    """``x @ cat(W_1..W_n)^T``: one GEMM over weights that share an input (autocast-aware)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        ctx.autocast_dtype = _autocast_dtype(x)
        ctx.first_weight = 1
        dtype = ctx.autocast_dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), _cat(weights).to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        grad_x, grad_ws = _grouped_backward(ctx, x, weights, grad, ctx.autocast_dtype or grad.dtype)
        return (grad_x, *grad_ws)


class _KeptProjection(torch.autograd.Function):
    """``a = post(x @ cat(W)^T)``, kept by the active CoLA-M region; backward ``g -> pre(g)`` then the
    grouped linear backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, post: Collective | None, pre: Collective | None, *weights: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, *weights)
        ctx.pre = pre
        ctx.autocast_dtype = _autocast_dtype(x)
        ctx.first_weight = 3
        region = _ACTIVE_REGION.get()
        if region is not None and region.replaying:
            return region.next_kept()
        dtype = ctx.autocast_dtype or x.dtype
        # The range names the only place the kept A GEMM runs (profiles, and the test that it is not
        # re-run in backward, also under torch.compile).
        with torch.autocast(x.device.type, enabled=False), torch.profiler.record_function(A_GEMM_RANGE):
            out = F.linear(x.to(dtype), _cat(weights).to(dtype))  # (..., sum r)
            if post is not None:
                out = post(out)
        if region is not None:
            region.keep(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        if ctx.pre is not None:
            grad = ctx.pre(grad)
        grad_x, grad_ws = _grouped_backward(ctx, x, weights, grad, ctx.autocast_dtype or grad.dtype)
        return (grad_x, None, None, *grad_ws)


@torch.compiler.disable
def _kept_projection(
    x: torch.Tensor, weights: Sequence[torch.Tensor], post: Collective | None, pre: Collective | None
) -> torch.Tensor:
    return _KeptProjection.apply(x, post, pre, *weights)


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x @ cat(weights)^T`` as one GEMM, for weights that read the same input (q/k/v, gate/up).

    Outputs and gradients are bitwise equal (fp32) to ``torch.cat([F.linear(x, w) for w in weights])``;
    a single weight is a plain ``F.linear``."""
    if len(weights) == 1:
        return F.linear(x, weights[0])
    return _GroupedLinear.apply(x, *weights)


def rank_projection(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    keep: bool = False,
    post: Collective | None = None,
    pre_backward: Collective | None = None,
) -> torch.Tensor:
    """CoLA's down-projection(s) ``x @ cat(weights)^T`` (several A's that share ``x`` run as one GEMM).

    With ``keep`` (layers built for CoLA-M) the output is kept by the active ``ColaMRegion`` instead of
    being recomputed; ``post`` (a raw collective, e.g. the row-parallel reduce-scatter) then runs inside
    the kept step and its conjugate ``pre_backward`` first in backward. Without ``keep``, ``post`` /
    ``pre_backward`` must be None (the caller applies an autograd-aware collective itself).
    Numerically identical to ``F.linear`` (under autocast too)."""
    if keep:
        return _kept_projection(x, weights, post, pre_backward)
    if post is not None or pre_backward is not None:
        raise ValueError("rank_projection: post/pre_backward are only for keep=True")
    return grouped_linear(x, weights)


@contextlib.contextmanager
def record_kept_tensors() -> Iterator[list[torch.Tensor]]:
    """Collect the tensors CoLA-M regions created inside this block keep (for measuring saved
    activations)."""
    store: list[torch.Tensor] = []
    token = _RECORDER.set(store)
    try:
        yield store
    finally:
        _RECORDER.reset(token)


def check_recompute_mode(mode: str) -> None:
    if mode not in RECOMPUTE_CHOICES:
        raise ValueError(f"unknown recompute mode {mode!r}; allowed: {list(RECOMPUTE_CHOICES)}")


def run_with_recompute(mode: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run ``fn(*args)`` under recomputation ``mode`` (one of ``config.RECOMPUTE_CHOICES``).

    Outside autograd (``torch.no_grad``) nothing is saved anyway, so the function is simply called.
    """
    check_recompute_mode(mode)
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    return checkpoint(ColaMRegion(fn), *args, use_reentrant=False)


__all__ = [
    "A_GEMM_RANGE",
    "ColaMRegion",
    "check_recompute_mode",
    "grouped_linear",
    "rank_projection",
    "record_kept_tensors",
    "run_with_recompute",
]
