"""Activation recomputation (whole-block checkpointing and CoLA-M) and the A projections it keeps.

CoLA-M keeps, per block, the residual stream entering each half-block (2 tensors of width d) and the
outputs of the A projections (7 rank-r tensors; 4 when q/k/v and gate/up are grouped), and recomputes
everything else in backward, without redoing the A GEMMs.

How: PyTorch's selective activation checkpointing. Each half-block runs under a non-reentrant
``torch.utils.checkpoint`` (which stores only the region's inputs and re-runs the region in backward to
rebuild what backward needs) whose ``context_fn`` applies one policy: the output of every *kept op* is
saved (``MUST_SAVE``), everything else is recomputed (``PREFER_RECOMPUTE``). The kept ops are the A
projections of layers built for CoLA-M (``keep=True``): ``megatron_cola::kept_linear``
(``torch.library.custom_op``: ``F.linear`` with the usual linear backward) and any op registered with
``register_kept_op`` (tensor parallelism registers its A projection fused with the reduce-scatter that
follows it). When the checkpoint re-runs a region in backward, the kept op's output comes from the
checkpoint's cache: its GEMM is not redone, and its backward (which needs only input and weight) is
unchanged. Backward thus redoes only the B projections, attention and the elementwise work.

Eagerly the checkpoint applies the policy op by op (two dispatch modes: one caches in forward, one
replays in recomputation); under ``torch.compile`` the policy tags the traced graph and the partitioner
saves exactly the kept ops' outputs, so a compiled block is one graph with no breaks. The modes are
torch's (what ``create_selective_checkpoint_contexts`` returns; private classes of the pinned torch),
narrowed to the kept ops when eager: torch's would also count every other op and fail when the
recomputation runs one more often than the forward did, which ZeRO-3's parameter gathering inside the
region does (it gathers what forward found already gathered). Kept ops are matched by call order, so
collectives and gathering inside the region are indifferent. Nothing here changes between calls but the
opt-in recorder of ``record_kept_tensors`` (for measuring what CoLA-M keeps).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _CachedTorchDispatchMode,
    _CachingTorchDispatchMode,
    _is_compiling,
    checkpoint,
)

from megatron_cola.config import RECOMPUTE_CHOICES

A_GEMM_RANGE = "cola_m.kept_a_gemm"
"""Profiler range around each GEMM of a kept (CoLA-M) A projection."""

_KEPT_OPS: set[torch._ops.OpOverload] = set()

# Where the tensors CoLA-M keeps are reported for measurement (None: not measuring). Set and reset only
# by ``record_kept_tensors``; read by the checkpoint policy on the forward thread.
_RECORDER: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "cola_m_recorder", default=None
)


def register_kept_op(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """Make CoLA-M's checkpoint policy keep the output of ``op`` (a kept A projection) instead of
    recomputing it. Returns ``op``."""
    _KEPT_OPS.add(op)
    return op


def linear_grads(
    needs_input_grad: Sequence[bool], x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``F.linear(x, weight)`` given the output gradient ``grad``: one GEMM each for the
    input ``(..., d_in)`` and the weight ``(n, d_in)``."""
    grad_x = grad @ weight if needs_input_grad[0] else None
    grad_w = None
    if needs_input_grad[1]:
        grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_w


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the autocast dtype when autocast is on for their device (what autocast does
    to the inputs of ``F.linear``; custom ops get no autocast rule of their own)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


@torch.library.custom_op("megatron_cola::kept_linear", mutates_args=())
def _kept_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # The range names the only place a kept A GEMM runs (profiles, and the tests that it is not re-run
    # in backward, eager and compiled).
    with torch.profiler.record_function(A_GEMM_RANGE):
        return F.linear(x, weight)


@_kept_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_kept_linear(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _kept_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    x, weight = ctx.saved_tensors
    return linear_grads(ctx.needs_input_grad, x, weight, grad)


_kept_linear.register_autograd(_kept_linear_backward, setup_context=_setup_kept_linear)
register_kept_op(torch.ops.megatron_cola.kept_linear.default)


def cat_weights(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[W_1; W_2; ...]`` (rows), the weight of a grouped projection; a single weight as it is."""
    return weights[0] if len(weights) == 1 else torch.cat(tuple(weights), dim=0)


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x @ cat(weights)^T`` as one GEMM, for weights that read the same input (q/k/v, gate/up).

    A plain ``F.linear`` on the concatenated weight: concatenated once per forward and saved for
    backward, where the input gradient is one GEMM too. Equals ``torch.cat([F.linear(x, w) ...])`` up to
    fp32 rounding (the input gradient sums over all members in one GEMM)."""
    return F.linear(x, cat_weights(weights))


def rank_projection(x: torch.Tensor, weights: Sequence[torch.Tensor], keep: bool = False) -> torch.Tensor:
    """CoLA's down-projection(s) ``x @ cat(weights)^T`` (several A's that share ``x`` run as one GEMM).

    With ``keep`` (layers built for CoLA-M) it runs as the kept op ``megatron_cola::kept_linear``, whose
    output CoLA-M's checkpoint saves instead of recomputing (autocast-aware: the inputs are cast as
    ``F.linear``'s would be)."""
    weight = cat_weights(weights)
    if not keep:
        return F.linear(x, weight)
    return torch.ops.megatron_cola.kept_linear(*autocast_inputs(x, weight))


def _cola_m_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op not in _KEPT_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    recorder = _RECORDER.get()
    if recorder is not None and type(ctx.op_output) is torch.Tensor:  # eager (compiling traces fakes)
        recorder.append(ctx.op_output)
    return CheckpointPolicy.MUST_SAVE


class _CacheKeptOps(_CachingTorchDispatchMode):
    """Forward of a CoLA-M region: torch's selective-checkpoint caching, for the kept ops only (every op
    while compiling, where it tags the graph)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in _KEPT_OPS and not _is_compiling(func, args, kwargs):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _ReplayKeptOps(_CachedTorchDispatchMode):
    """Recomputation of a CoLA-M region: kept ops are served from the cache, every other op runs."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in _KEPT_OPS and not _is_compiling(func, args, kwargs):
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


def _cola_m_contexts() -> tuple[_CacheKeptOps, _ReplayKeptOps]:
    """The checkpoint's ``context_fn`` for CoLA-M (``create_selective_checkpoint_contexts`` with
    ``_cola_m_policy``, narrowed to the kept ops)."""
    storage: dict[Any, dict[int, Any]] = defaultdict(dict)
    return _CacheKeptOps(_cola_m_policy, storage), _ReplayKeptOps(None, storage)


# Lets torch.compile's AOTAutograd cache graphs holding CoLA-M regions (bump when the policy changes).
_cola_m_contexts.cache_hash = "megatron_cola.cola_m_contexts.v1"  # type: ignore[attr-defined]


@contextlib.contextmanager
def record_kept_tensors() -> Iterator[list[torch.Tensor]]:
    """Collect the outputs CoLA-M's checkpoints save (the kept A outputs) in eager forwards run inside
    this block (for measuring saved activations)."""
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
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_cola_m_contexts)


__all__ = [
    "A_GEMM_RANGE",
    "autocast_inputs",
    "cat_weights",
    "check_recompute_mode",
    "grouped_linear",
    "linear_grads",
    "rank_projection",
    "record_kept_tensors",
    "register_kept_op",
    "run_with_recompute",
]
