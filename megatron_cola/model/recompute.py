"""Activation recomputation: whole-block checkpointing and CoLA-M.

CoLA-M keeps, per block, the residual stream entering each half-block (2 tensors of width d) and the
outputs of the seven A projections (7 tensors of width r), and recomputes everything else in backward.
It is built on PyTorch's selective activation checkpointing: each half-block runs under a non-reentrant
checkpoint whose policy marks the A GEMMs ``MUST_SAVE``. In backward the half-block is re-run, but the
marked GEMMs are served from the cache instead of being recomputed, so backward redoes only the B
projections, attention and the elementwise work.

``CoLALinear`` (and its tensor-parallel twins) wrap their A GEMM in ``keep_for_backward()``; that is how
the policy recognises it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_keep_depth = 0
_recorders: list[list[torch.Tensor]] = []


@contextlib.contextmanager
def keep_for_backward() -> Iterator[None]:
    """Mark the ops run inside as ones whose outputs CoLA-M keeps (instead of recomputing)."""
    global _keep_depth
    _keep_depth += 1
    try:
        yield
    finally:
        _keep_depth -= 1


# Only the GEMM itself is kept: the views of its input that ``F.linear`` makes around it alias the
# (d-sized) input and would keep it alive, and casts/transposes are cheap to redo.
_KEPT_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _cola_m_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if _keep_depth > 0 and func in _KEPT_OPS:
        if _recorders and not ctx.is_recompute:
            out = getattr(ctx, "op_output", None)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    _recorders[-1].append(t)
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _cola_m_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_cola_m_policy)


@contextlib.contextmanager
def record_kept_tensors() -> Iterator[list[torch.Tensor]]:
    """Collect the tensors CoLA-M's checkpoint cache keeps (for measuring saved activations)."""
    store: list[torch.Tensor] = []
    _recorders.append(store)
    try:
        yield store
    finally:
        _recorders.pop()


def run_with_recompute(mode: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run ``fn(*args)`` under recomputation ``mode`` (``none``, ``full`` or ``cola-m``).

    Outside autograd (``torch.no_grad`` or inputs that need no grad) nothing is saved anyway, so the
    function is simply called.
    """
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "cola-m":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_cola_m_context)
    raise ValueError(f"unknown recompute mode {mode!r}; allowed: ['none', 'full', 'cola-m']")


__all__ = ["keep_for_backward", "record_kept_tensors", "run_with_recompute"]
