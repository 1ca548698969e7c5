"""Tensor-parallel communication as autograd functions (Megatron's f/g pattern).

Each mapping takes its process group explicitly and has the conjugate collective as its backward:

=================================  ==============================  ==============================
mapping                            forward                         backward
=================================  ==============================  ==============================
``copy_to_tp``                     identity                        all-reduce
``reduce_from_tp``                 all-reduce                      identity
``reduce_to_sharded_tp``           all-reduce                      all-reduce
``gather_from_tp_last_dim``        all-gather (last dim)           keep this rank's slice
``all_gather_last_dim``            all-gather (last dim)           reduce-scatter (last dim)
``reduce_scatter_to_tp_last_dim``  reduce-scatter (last dim)       all-gather (last dim)
=================================  ==============================  ==============================

``gather_from_tp_last_dim`` is for a gathered tensor whose consumers are *replicated* (e.g. full
logits): every rank then holds the same full gradient and keeps its slice. ``all_gather_last_dim`` is
for a gathered tensor whose consumers are *sharded* (CoLA's rank-r activation feeding a column-parallel
B): each rank holds only its consumers' part of the gradient, so the parts are summed and scattered.
``reduce_to_sharded_tp`` likewise sums partial tensors whose consumers are sharded (the bottleneck
scheme's final RMSNorm: a per-token sum of squares scaling each rank's slice of the hidden state), so
the gradient parts are summed again in backward. The bottleneck scheme's A projections all-reduce
inside one op (``megatron_cola::kept_linear_all_reduce``, ``parallel/bottleneck.py``).

A group of size 1 (or ``None``) makes every mapping the identity. Every collective reports to the
active ``CommCounter``s (``megatron_cola.parallel.counter``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_cola.parallel.counter import record

# torch >= 2.13 names the flat-tensor collectives *_single; older releases *_into_tensor / *_tensor.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: ProcessGroup | None) -> int:
    """Size of ``group``; ``None`` (no group, single process) counts as 1."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank within ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------- raw collectives (counted)
def all_reduce(
    x: torch.Tensor,
    group: ProcessGroup | None,
    direction: str = "forward",
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """All-reduce a copy of ``x`` (the input is never modified) and return it."""
    t = group_size(group)
    if t == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=op, group=group)
    record("all_reduce", direction, out.numel(), out.element_size(), t)
    return out


def all_gather_last_dim_raw(x: torch.Tensor, group: ProcessGroup | None, direction: str) -> torch.Tensor:
    """``(..., k)`` on each rank → ``(..., t*k)``: the ranks' tensors concatenated on the last dim."""
    t = group_size(group)
    if t == 1:
        return x
    x = x.contiguous()
    stacked = torch.empty((t, *x.shape), dtype=x.dtype, device=x.device)  # (t, ..., k)
    _all_gather_flat(stacked.view(-1), x.view(-1), group=group)  # flat buffers: every backend takes them
    record("all_gather", direction, stacked.numel(), stacked.element_size(), t)
    return stacked.movedim(0, -2).reshape(*x.shape[:-1], t * x.shape[-1])  # (..., t, k) -> (..., t*k)


def reduce_scatter_last_dim_raw(x: torch.Tensor, group: ProcessGroup | None, direction: str) -> torch.Tensor:
    """``(..., t*k)`` on each rank → ``(..., k)``: this rank's last-dim slice of the sum over ranks."""
    t = group_size(group)
    if t == 1:
        return x
    if x.shape[-1] % t:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the tensor-parallel size {t}")
    k = x.shape[-1] // t
    stacked = x.reshape(*x.shape[:-1], t, k).movedim(-2, 0).contiguous()  # (t, ..., k)
    out = torch.empty(stacked.shape[1:], dtype=x.dtype, device=x.device)  # (..., k)
    _reduce_scatter_flat(out.view(-1), stacked.view(-1), group=group)
    record("reduce_scatter", direction, stacked.numel(), stacked.element_size(), t)
    return out


def split_last_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """This rank's slice of the last dimension (contiguous, no communication)."""
    t = group_size(group)
    if t == 1:
        return x
    if x.shape[-1] % t:
        raise ValueError(f"last dim {x.shape[-1]} is not divisible by the tensor-parallel size {t}")
    return x.chunk(t, dim=-1)[group_rank(group)].contiguous()


# ---------------------------------------------------------------------- autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce(grad, ctx.group, "backward"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ReduceToShardedTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce(grad, ctx.group, "backward"), None


class _GatherFromTPLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_last_dim_raw(x, group, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return split_last_dim(grad, ctx.group), None


class _AllGatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return all_gather_last_dim_raw(x, group, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return reduce_scatter_last_dim_raw(grad, ctx.group, "backward"), None


class _ReduceScatterToTPLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return reduce_scatter_last_dim_raw(x, group, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_gather_last_dim_raw(grad, ctx.group, "backward"), None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a region with partial sums: all-reduce forward, identity backward."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def reduce_to_sharded_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum partial tensors over the group for sharded consumers: all-reduce forward and backward."""
    return x if group_size(group) == 1 else _ReduceToShardedTP.apply(x, group)


def gather_from_tp_last_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather the last dim for replicated consumers; backward keeps this rank's gradient slice."""
    return x if group_size(group) == 1 else _GatherFromTPLastDim.apply(x, group)


def all_gather_last_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather the last dim for sharded consumers; backward reduce-scatters the gradient."""
    return x if group_size(group) == 1 else _AllGatherLastDim.apply(x, group)


def reduce_scatter_to_tp_last_dim(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum partial tensors over the group, keep this rank's last-dim slice; backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterToTPLastDim.apply(x, group)


__all__ = [
    "all_gather_last_dim",
    "all_reduce",
    "copy_to_tp",
    "gather_from_tp_last_dim",
    "group_rank",
    "group_size",
    "reduce_from_tp",
    "reduce_scatter_to_tp_last_dim",
    "reduce_to_sharded_tp",
    "split_last_dim",
]
