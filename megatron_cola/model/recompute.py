"""Activation recomputation: whole-block checkpointing and CoLA-M.

CoLA-M keeps, per block, the residual stream entering each half-block (2 tensors of width d) and the
outputs of the seven A projections (7 tensors of width r), and recomputes everything else in backward,
without redoing the A GEMMs.

How: each half-block runs under a non-reentrant ``torch.utils.checkpoint`` (which stores only the
region's inputs and re-runs the region in backward to rebuild whatever backward needs). Every A
projection goes through ``rank_projection``, an autograd function that saves its *input and weight*
(as ``F.linear`` would) and whose output is additionally kept in the region's cache on the forward pass.
When the checkpoint re-runs the region, ``rank_projection`` saves the (recomputed) input again but
returns the cached output instead of multiplying: the GEMM is not redone, and its backward (which needs
only input and weight) is unchanged. Backward thus redoes only the B projections, attention and the
elementwise work. Because the cache is matched by call order, not by tracing the ops the region runs,
this is indifferent to collectives or ZeRO-3 parameter gathering inside the region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Collective = Callable[[torch.Tensor], torch.Tensor]

_regions: list[_ColaMRegion] = []
_recorders: list[list[torch.Tensor]] = []


class _ColaMRegion:
    """A checkpointed function plus the A outputs it keeps; the first call records, later calls replay."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.kept: list[torch.Tensor] = []
        self.calls = 0
        self.cursor = 0

    @property
    def replaying(self) -> bool:
        return self.calls > 1

    def __call__(self, *args: Any) -> torch.Tensor:
        self.calls += 1
        self.cursor = 0
        _regions.append(self)
        try:
            return self.fn(*args)
        finally:
            _regions.pop()


class _RankProjection(torch.autograd.Function):
    """``a = post(x @ W^T)``; backward ``g -> pre(g)`` then the usual linear backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        post: Collective | None,
        pre: Collective | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pre = pre
        ctx.autocast_dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        )
        region = _regions[-1] if _regions else None
        if region is not None and region.replaying:
            out = region.kept[region.cursor]
            region.cursor += 1
            return out.detach()
        compute_dtype = ctx.autocast_dtype or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x.to(compute_dtype), weight.to(compute_dtype))  # (..., r)
            if post is not None:
                out = post(out)
        if region is not None:
            region.kept.append(out.detach())
            if _recorders:
                _recorders[-1].append(region.kept[-1])
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        if ctx.pre is not None:
            grad = ctx.pre(grad)
        dtype = ctx.autocast_dtype or grad.dtype
        g = grad.to(dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).T @ x.to(dtype).reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None


def rank_projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    post: Collective | None = None,
    pre_backward: Collective | None = None,
) -> torch.Tensor:
    """A CoLA down-projection ``x @ weight^T`` (optionally followed by a collective ``post`` whose
    conjugate ``pre_backward`` runs first in backward), whose output CoLA-M keeps instead of recomputing.
    Numerically identical to ``F.linear`` (under autocast too)."""
    return _RankProjection.apply(x, weight, post, pre_backward)


@contextlib.contextmanager
def record_kept_tensors() -> Iterator[list[torch.Tensor]]:
    """Collect the tensors CoLA-M regions keep (for measuring saved activations)."""
    store: list[torch.Tensor] = []
    _recorders.append(store)
    try:
        yield store
    finally:
        _recorders.pop()


def run_with_recompute(mode: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run ``fn(*args)`` under recomputation ``mode`` (``none``, ``full`` or ``cola-m``).

    Outside autograd (``torch.no_grad``) nothing is saved anyway, so the function is simply called.
    """
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "cola-m":
        return checkpoint(_ColaMRegion(fn), *args, use_reentrant=False)
    raise ValueError(f"unknown recompute mode {mode!r}; allowed: ['none', 'full', 'cola-m']")


__all__ = ["rank_projection", "record_kept_tensors", "run_with_recompute"]
