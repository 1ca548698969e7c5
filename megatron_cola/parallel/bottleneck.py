"""The bottleneck tensor-parallel scheme (``--cola-tp-scheme bottleneck``): twins of a CoLA model's layers.

After BOOST (arXiv 2512.12131): the residual stream stays sharded on the hidden dimension, each of the
``t`` ranks holding ``d/t`` of every token's hidden state from the embedding to the final norm, and
every CoLA map ``B σ(A x)`` talks only at its rank-r bottleneck:

- ``A`` is row-parallel, ``(r, d_in/t)`` on the rank's input slice; its partial sums are all-reduced at
  width r (``megatron_cola::kept_linear_all_reduce``: the GEMM and the all-reduce as one op, kept whole
  by CoLA-M, so recomputation needs no collective). Grouped q/k/v (gate/up) run one GEMM and one
  all-reduce of 3r (2r).
- σ runs on the full r on every rank (tiny), then ``copy_to_tp``: backward all-reduces the r-wide
  gradient at B's input, the conjugate of the forward all-reduce.
- ``B`` is column-parallel, ``(d_out/t, r)``: q/k/v give the local heads, gate/up the local ffn shard,
  o and down the local ``d/t`` slice of the residual stream.

RMSNorm stays exact (BOOST's default normalises each slice by its local RMS, which changes the model).
A norm before q/k/v or gate/up (``DeferredRMSNorm``) returns ``[g ⊙ x_local, Σ x_local²]``, a
``(..., d/t + 1)`` tensor; the maps it feeds append the sum of squares to their A all-reduce and divide
the summed ``A (g ⊙ x)`` by the global RMS afterwards: ``A(g ⊙ x / rms) = A(g ⊙ x) / rms`` per token,
what TP=1 computes. The final norm (``ShardedRMSNorm``) all-reduces its per-token sum of squares
(forward and backward: its consumers are sharded), and the vocab-parallel head all-gathers the ``d/t``
slices. The embedding is split on d (``HiddenShardedEmbedding``): a lookup, no collective.

Full-rank models keep Megatron's dense TP (``parallel/layers.py``), whatever the flag says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_cola.model.cola_linear import CoLALinear, cola_init_std, get_activation
from megatron_cola.model.layers import RMSNorm
from megatron_cola.model.recompute import (
    A_GEMM_RANGE,
    autocast_inputs,
    cat_weights,
    linear_grads,
    register_kept_op,
)
from megatron_cola.parallel.counter import record
from megatron_cola.parallel.layers import ShardedModule, divide_evenly, group_by_name
from megatron_cola.parallel.mappings import copy_to_tp, reduce_to_sharded_tp
from megatron_cola.parallel.state import ParallelState


@torch.library.custom_op("megatron_cola::kept_linear_all_reduce", mutates_args=())
def _kept_linear_all_reduce(
    x: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor, group_name: str
) -> torch.Tensor:
    """``all_reduce(cat([F.linear(x, weight), extra], -1))``: a row-parallel A, the columns ``extra``
    (a deferred norm's sum of squares, or none) appended, summed over the TP group in one collective.
    Backward is local (the consumers are replicated): the linear's gradients and ``extra``'s slice."""
    with torch.profiler.record_function(A_GEMM_RANGE):
        partial = F.linear(x, weight)  # (..., n): partial sum over the input shards
    payload = torch.cat((partial, extra.to(partial.dtype)), dim=-1)  # (..., n + e)
    group = group_by_name(group_name)
    dist.all_reduce(payload, group=group)
    record("all_reduce", "forward", payload.numel(), payload.element_size(), dist.get_world_size(group))
    return payload


@_kept_linear_all_reduce.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] + extra.shape[-1]))


def _setup_kept_ar(
    ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, str], output: torch.Tensor
) -> None:
    x, weight, extra, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.extra_dtype = extra.dtype


def _kept_ar_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    n = weight.shape[0]
    grad_x, grad_w = linear_grads(ctx.needs_input_grad, x, weight, grad[..., :n])
    grad_extra = grad[..., n:].to(ctx.extra_dtype) if ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_extra, None


_kept_linear_all_reduce.register_autograd(_kept_ar_backward, setup_context=_setup_kept_ar)
register_kept_op(torch.ops.megatron_cola.kept_linear_all_reduce.default)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32, where norm statistics are accumulated (as ``F.rms_norm`` does)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms_scale(sum_sq: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x²) + eps)`` per token from the global sum of squares ``(..., 1)``."""
    return torch.rsqrt(_wide(sum_sq) / width + eps)


class BottleneckCoLA(ShardedModule):
    """A CoLA map under the bottleneck scheme: A row-parallel + r-wide all-reduce, B column-parallel.

    ``norm_eps`` set: the input is a ``DeferredRMSNorm`` packet ``(..., d_in/t + 1)`` and the map
    finishes that norm after its all-reduce; otherwise the input is this rank's ``(..., d_in/t)``.
    Output: this rank's ``(..., d_out/t)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        state: ParallelState,
        activation: str = "silu",
        norm_eps: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.tp_size = state.tp_size
        self.in_features_local = divide_evenly(in_features, state.tp_size, "in_features")
        self.out_features_local = divide_evenly(out_features, state.tp_size, "out_features")
        self.activation = activation
        self.act_fn = get_activation(activation)
        self.norm_eps = norm_eps
        self.group = state.tp_group
        self._add_sharded("weight_a", (rank, in_features), 1, state, device, dtype)  # (r, d_in/t)
        self._add_sharded("weight_b", (out_features, rank), 0, state, device, dtype)  # (d_out/t, r)

    @classmethod
    def from_dense(
        cls, layer: CoLALinear, state: ParallelState, norm_eps: float | None = None
    ) -> BottleneckCoLA:
        if layer.bias is not None:
            raise ValueError("tensor-parallel CoLA layers support bias=False only (CoLA models use none)")
        w = layer.weight_a
        twin = cls(
            layer.in_features,
            layer.out_features,
            layer.rank,
            state,
            layer.activation,
            norm_eps,
            w.device,
            w.dtype,
        )
        twin.copy_shards_from(layer)
        return twin

    @property
    def init_std(self) -> float:
        return cola_init_std(self.in_features, self.out_features, self.rank)

    def rank_activation(self, layers: Sequence[BottleneckCoLA], x: torch.Tensor) -> torch.Tensor:
        """σ of the all-reduced A output(s) of ``layers`` (this one first; one GEMM and one all-reduce
        for all), entered into the TP region: ``(..., Σ r)``, replicated."""
        weight = cat_weights([layer.weight_a for layer in layers])  # (Σr, d_in/t)
        if self.norm_eps is not None:
            x, extra = x[..., :-1], x[..., -1:]  # the deferred norm's g ⊙ x and Σ x² (..., 1)
        else:
            extra = x.new_empty((*x.shape[:-1], 0))
        x, weight = autocast_inputs(x, weight)
        out = torch.ops.megatron_cola.kept_linear_all_reduce(x, weight, extra, self.group.group_name)
        a = out[..., : weight.shape[0]]  # (..., Σr), summed over the input shards
        if self.norm_eps is not None:
            a = a * _rms_scale(out[..., -1:], self.in_features, self.norm_eps).to(a.dtype)
        return copy_to_tp(self.act_fn(a), self.group)  # backward: all-reduce of the r-wide gradient

    def from_activated(self, s: torch.Tensor) -> torch.Tensor:
        """B on the replicated activation: ``(..., r) -> (..., d_out/t)``."""
        return F.linear(s, self.weight_b)

    def project_shared_input(self, layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
        """``[layer(x) for layer in layers]`` with one A GEMM and one all-reduce for all (the grouped
        q/k/v or gate/up of ``model.cola_linear.project_shared_input``)."""
        if not all(isinstance(layer, BottleneckCoLA) for layer in layers):
            raise ValueError("grouped projections must all be bottleneck CoLA layers")
        if len({(layer.activation, layer.norm_eps) for layer in layers}) != 1:
            raise ValueError("grouped bottleneck CoLA layers must agree on activation and norm")
        s = self.rank_activation(layers, x)
        parts = s.split([layer.rank for layer in layers], dim=-1)
        return [layer.from_activated(part) for layer, part in zip(layers, parts)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_activated(self.rank_activation((self,), x))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.in_features_local}), "
            f"out_features={self.out_features} (local {self.out_features_local}), rank={self.rank}, "
            f"activation={self.activation}, deferred_norm={self.norm_eps is not None}, "
            f"tp_size={self.tp_size}"
        )


class _ShardedNorm(ShardedModule):
    """An RMSNorm's scale split on d: ``(d/t,)``."""

    init_ones = True  # as ``RMSNorm``: ``init_weights`` starts the scale at 1

    def __init__(
        self,
        dim: int,
        eps: float,
        state: ParallelState,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.group = state.tp_group
        self._add_sharded("weight", (dim,), 0, state, device, dtype)

    @classmethod
    def from_dense(cls, norm: RMSNorm, state: ParallelState) -> _ShardedNorm:
        w = norm.weight
        twin = cls(w.shape[0], norm.eps, state, w.device, w.dtype)
        twin.copy_shards_from(norm)
        return twin

    def extra_repr(self) -> str:
        return f"{self.dim} (local {self.weight.shape[0]}), eps={self.eps}"


class DeferredRMSNorm(_ShardedNorm):
    """The RMSNorm before q/k/v or gate/up: ``(..., d/t) -> (..., d/t + 1)``, ``[g ⊙ x, Σ x²]``; the
    ``BottleneckCoLA`` maps it feeds divide by the global RMS after their all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sum_sq = _wide(x).pow(2).sum(dim=-1, keepdim=True)  # (..., 1): this rank's share
        return torch.cat((x * self.weight, sum_sq.to(x.dtype)), dim=-1)


class ShardedRMSNorm(_ShardedNorm):
    """The final RMSNorm on this rank's ``(..., d/t)``: one all-reduce of the per-token sum of squares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sum_sq = reduce_to_sharded_tp(_wide(x).pow(2).sum(dim=-1, keepdim=True), self.group)  # (..., 1)
        return (_wide(x) * _rms_scale(sum_sq, self.dim, self.eps)).to(x.dtype) * self.weight


class HiddenShardedEmbedding(ShardedModule):
    """The embedding split on d: ``E[:, d/t]`` per rank, a plain lookup giving this rank's slice."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        state: ParallelState,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.embedding_dim_local = divide_evenly(embedding_dim, state.tp_size, "hidden_size")
        self._add_sharded("weight", (num_embeddings, embedding_dim), 1, state, device, dtype)  # (V, d/t)

    @classmethod
    def from_dense(cls, layer: nn.Embedding, state: ParallelState) -> HiddenShardedEmbedding:
        w = layer.weight
        twin = cls(layer.num_embeddings, layer.embedding_dim, state, w.device, w.dtype)
        twin.copy_shards_from(layer)
        return twin

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)  # (..., d/t)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (local {self.embedding_dim_local})"


__all__ = ["BottleneckCoLA", "DeferredRMSNorm", "HiddenShardedEmbedding", "ShardedRMSNorm"]
