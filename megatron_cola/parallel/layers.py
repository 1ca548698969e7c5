"""Sharded twins of the model's layers, for tensor parallelism of size ``t`` (rank ``i``).

CoLA ``y = B σ(A x)`` with ``A: (r, d_in)``, ``B: (d_out, r)`` (``nn.Linear`` layout):

``ColumnParallelCoLA`` (q, k, v, gate, up): ``A`` split over r (rows, ``(r/t, d_in)``), σ on the local
rank slice, all-gather of the rank-r activation, ``B`` split over the output (rows, ``(d_out/t, r)``):
the output is this rank's heads / ffn shard. Backward: the gather's gradient is reduce-scattered (its
consumers are sharded) and the gradient of ``x`` is all-reduced where the region is entered
(``copy_to_tp``, done once per attention / MLP by ``apply_tensor_parallel``, not per layer).

``RowParallelCoLA`` (o, down): ``A`` split over its input (columns, ``(r, d_in/t)``) gives partial
sums of the rank-r pre-activation, reduce-scattered onto the rank slices; σ local; ``B`` split over r
(columns, ``(d_out, r/t)``) gives partial sums of the output, all-reduced.

Both run A through ``megatron_cola.model.recompute.rank_projection``, so CoLA-M keeps the r/t slice of
every A output (for o / down the reduce-scatter is the projection's ``post`` step and is not re-run in
recomputation; the all-gathers of q/k/v/gate/up are).

``ColumnParallelLinear`` / ``RowParallelLinear``: Megatron's dense scheme for the full-rank model and
the LM head. ``VocabParallelEmbedding``: rows split, masked lookup, all-reduce.

Parameters keep the plain model's names (``weight_a``, ``weight_b``, ``weight``) and carry
``full_shape``, ``shard_fn``, ``tp_split_dim`` (and ``tensor_model_parallel = True`` for DeepSpeed's
norm code), so ``CoLALlama.init_weights`` cuts each shard from the full seeded weight; the twins
re-attach these when ``to_empty`` (meta → device) or ``load_state_dict(assign=True)`` replaces a
parameter object. ``in_features``, ``out_features`` and ``rank`` are the full (unsharded) sizes;
``*_local`` the shard's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_cola.model.cola_linear import CoLALinear, cola_init_std, get_activation
from megatron_cola.model.recompute import rank_projection
from megatron_cola.parallel.mappings import (
    all_gather_last_dim,
    all_gather_last_dim_raw,
    copy_to_tp,
    reduce_from_tp,
    reduce_scatter_last_dim_raw,
)
from megatron_cola.parallel.state import ParallelState


@dataclass(frozen=True)
class ShardSpec:
    """This rank's shard of a ``full_shape`` tensor split in ``tp_size`` equal chunks along ``dim``.

    Callable as a parameter's ``shard_fn``: ``full -> full.chunk(tp_size, dim)[tp_rank]`` (a view).
    """

    full_shape: tuple[int, ...]
    dim: int
    tp_size: int
    tp_rank: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] = _divide(shape[self.dim], self.tp_size, f"dim {self.dim} of {self.full_shape}")
        return tuple(shape)

    def __call__(self, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.tp_size, dim=self.dim)[self.tp_rank]

    def tag(self, param: nn.Parameter) -> nn.Parameter:
        """Attach the attributes init, checkpoints and DeepSpeed read to ``param``; returns it."""
        param.full_shape = self.full_shape
        param.tp_split_dim = self.dim
        param.shard_fn = self
        # Read by DeepSpeed's gradient-norm code (``is_model_parallel_parameter``) and Megatron-style tools.
        param.tensor_model_parallel = True
        param.partition_dim = self.dim
        param.partition_stride = 1
        return param


def _divide(n: int, t: int, what: str) -> int:
    if n % t:
        raise ValueError(f"{what} {n} is not divisible by tensor-model-parallel size {t}")
    return n // t


def sharded_parameter(
    full_shape: tuple[int, ...],
    dim: int,
    state: ParallelState,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Parameter:
    """An uninitialised, tagged parameter holding this rank's shard of ``full_shape`` split on ``dim``."""
    spec = ShardSpec(tuple(full_shape), dim, state.tp_size, state.tp_rank)
    return spec.tag(nn.Parameter(torch.empty(spec.local_shape, device=device, dtype=dtype)))


@torch.no_grad()
def copy_shard_(param: nn.Parameter, full: torch.Tensor) -> None:
    """Fill ``param`` with its shard of ``full`` (skipped on the meta device: nothing to copy)."""
    if param.device.type == "meta" or full.device.type == "meta":
        return
    param.copy_(param.shard_fn(full))


def _retag_after_load(module: nn.Module, incompatible_keys: object) -> None:
    module.retag_sharded_parameters()


class ShardedModule(nn.Module):
    """Base of the sharded twins: keeps the TP attributes on its parameters.

    Some conversions replace a ``Parameter`` object by a fresh one without its attributes
    (``to_empty`` from the meta device, ``load_state_dict(assign=True)``); the module therefore keeps
    each shard's ``ShardSpec`` and re-tags its parameters after them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._shard_specs: dict[str, ShardSpec] = {}
        self.register_load_state_dict_post_hook(_retag_after_load)

    def _add_sharded(
        self,
        name: str,
        full_shape: tuple[int, ...],
        dim: int,
        state: ParallelState,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> nn.Parameter:
        param = sharded_parameter(full_shape, dim, state, device, dtype)
        self._shard_specs[name] = param.shard_fn
        self.register_parameter(name, param)
        return param

    def retag_sharded_parameters(self) -> None:
        for name, spec in self._shard_specs.items():
            param = getattr(self, name)
            if getattr(param, "shard_fn", None) is not spec:
                spec.tag(param)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ShardedModule:
        out = super()._apply(fn, recurse)
        self.retag_sharded_parameters()
        return out


class ColumnParallelCoLA(ShardedModule):
    """CoLA map whose output is sharded: A over r, all-gather at the bottleneck, B over the output."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        state: ParallelState,
        activation: str = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.tp_size = state.tp_size
        self.rank_local = _divide(rank, state.tp_size, "cola_rank")
        self.out_features_local = _divide(out_features, state.tp_size, "out_features")
        self.activation = activation
        self.act_fn = get_activation(activation)
        self.group = state.tp_group
        self._add_sharded("weight_a", (rank, in_features), 0, state, device, dtype)  # (r/t, d_in)
        self._add_sharded("weight_b", (out_features, rank), 0, state, device, dtype)  # (d_out/t, r)

    @classmethod
    def from_dense(cls, layer: CoLALinear, state: ParallelState) -> ColumnParallelCoLA:
        if layer.bias is not None:
            raise ValueError("tensor-parallel CoLA layers support bias=False only (CoLA models use none)")
        w = layer.weight_a
        twin = cls(
            layer.in_features, layer.out_features, layer.rank, state, layer.activation, w.device, w.dtype
        )
        copy_shard_(twin.weight_a, layer.weight_a)
        copy_shard_(twin.weight_b, layer.weight_b)
        return twin

    @property
    def init_std(self) -> float:
        return cola_init_std(self.in_features, self.out_features, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in), replicated; the caller entered the TP region (copy_to_tp) once for q/k/v.
        a = rank_projection(x, self.weight_a)  # (..., r/t): kept by CoLA-M
        s = all_gather_last_dim(self.act_fn(a), self.group)  # (..., r)
        return F.linear(s, self.weight_b)  # (..., d_out/t)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.out_features_local}), rank={self.rank} (local {self.rank_local}), "
            f"activation={self.activation}, tp_size={self.tp_size}"
        )


class RowParallelCoLA(ShardedModule):
    """CoLA map whose input is sharded: A over the input, reduce-scatter at the bottleneck, B over r."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        state: ParallelState,
        activation: str = "silu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.tp_size = state.tp_size
        self.rank_local = _divide(rank, state.tp_size, "cola_rank")
        self.in_features_local = _divide(in_features, state.tp_size, "in_features")
        self.activation = activation
        self.act_fn = get_activation(activation)
        self.group = state.tp_group
        self._add_sharded("weight_a", (rank, in_features), 1, state, device, dtype)  # (r, d_in/t)
        self._add_sharded("weight_b", (out_features, rank), 1, state, device, dtype)  # (d_out, r/t)

    @classmethod
    def from_dense(cls, layer: CoLALinear, state: ParallelState) -> RowParallelCoLA:
        if layer.bias is not None:
            raise ValueError("tensor-parallel CoLA layers support bias=False only (CoLA models use none)")
        w = layer.weight_a
        twin = cls(
            layer.in_features, layer.out_features, layer.rank, state, layer.activation, w.device, w.dtype
        )
        copy_shard_(twin.weight_a, layer.weight_a)
        copy_shard_(twin.weight_b, layer.weight_b)
        return twin

    @property
    def init_std(self) -> float:
        return cola_init_std(self.in_features, self.out_features, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in/t), this rank's heads / ffn shard.
        # A's output is a partial sum over the input shards (..., r); reduce-scatter it onto the rank
        # slices (..., r/t). Both happen inside rank_projection, so CoLA-M keeps the r/t slice.
        a = rank_projection(
            x,
            self.weight_a,
            post=functools.partial(reduce_scatter_last_dim_raw, group=self.group, direction="forward"),
            pre_backward=functools.partial(all_gather_last_dim_raw, group=self.group, direction="backward"),
        )  # (..., r/t)
        y_partial = F.linear(self.act_fn(a), self.weight_b)  # (..., d_out): partial sum over r
        return reduce_from_tp(y_partial, self.group)  # (..., d_out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.in_features_local}), "
            f"out_features={self.out_features}, rank={self.rank} (local {self.rank_local}), "
            f"activation={self.activation}, tp_size={self.tp_size}"
        )


class ColumnParallelLinear(ShardedModule):
    """Dense ``x W^T`` with W split over the output (rows): output is this rank's shard, no gather.

    With ``copy_input`` the layer enters the TP region itself (the LM head); q/k/v and gate/up leave
    that to their shared entry point so the input gradient is all-reduced once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        state: ParallelState,
        copy_input: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_size = state.tp_size
        self.out_features_local = _divide(out_features, state.tp_size, "out_features")
        self.copy_input = copy_input
        self.group = state.tp_group
        self._add_sharded("weight", (out_features, in_features), 0, state, device, dtype)  # (out/t, in)

    @classmethod
    def from_dense(
        cls, layer: nn.Linear, state: ParallelState, copy_input: bool = False
    ) -> ColumnParallelLinear:
        if layer.bias is not None:
            raise ValueError("tensor-parallel linear layers support bias=False only")
        w = layer.weight
        twin = cls(layer.in_features, layer.out_features, state, copy_input, w.device, w.dtype)
        copy_shard_(twin.weight, w)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return F.linear(x, self.weight)  # (..., out/t)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.out_features_local}), tp_size={self.tp_size}, copy_input={self.copy_input}"
        )


class RowParallelLinear(ShardedModule):
    """Dense ``x W^T`` with W split over the input (columns): partial outputs, all-reduced."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        state: ParallelState,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_size = state.tp_size
        self.in_features_local = _divide(in_features, state.tp_size, "in_features")
        self.group = state.tp_group
        self._add_sharded("weight", (out_features, in_features), 1, state, device, dtype)  # (out, in/t)

    @classmethod
    def from_dense(cls, layer: nn.Linear, state: ParallelState) -> RowParallelLinear:
        if layer.bias is not None:
            raise ValueError("tensor-parallel linear layers support bias=False only")
        w = layer.weight
        twin = cls(layer.in_features, layer.out_features, state, w.device, w.dtype)
        copy_shard_(twin.weight, w)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(F.linear(x, self.weight), self.group)  # (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.in_features_local}), "
            f"out_features={self.out_features}, tp_size={self.tp_size}"
        )


class VocabParallelEmbedding(ShardedModule):
    """Embedding with the vocab (rows) split: rank ``i`` owns ids ``[i V/t, (i+1) V/t)``.

    Each rank looks up the ids it owns, zeroes the others, and the rows are summed over the group.
    """

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
        self.tp_size = state.tp_size
        self.num_embeddings_local = _divide(num_embeddings, state.tp_size, "vocab_size")
        self.vocab_start = state.tp_rank * self.num_embeddings_local
        self.group = state.tp_group
        self._add_sharded("weight", (num_embeddings, embedding_dim), 0, state, device, dtype)  # (V/t, d)

    @classmethod
    def from_dense(cls, layer: nn.Embedding, state: ParallelState) -> VocabParallelEmbedding:
        w = layer.weight
        twin = cls(layer.num_embeddings, layer.embedding_dim, state, w.device, w.dtype)
        copy_shard_(twin.weight, w)
        return twin

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings_local)
        emb = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., d)
        emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(emb, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (local {self.num_embeddings_local} from {self.vocab_start}), "
            f"{self.embedding_dim}, tp_size={self.tp_size}"
        )


class CopyToTPHook:
    """Forward pre-hook entering the TP region: ``module(x, ...)`` sees ``copy_to_tp(x)``.

    Registered (``with_kwargs=True``) on each attention and MLP, so q/k/v (gate/up) share one
    all-reduce of the input gradient in backward instead of one each.
    """

    def __init__(self, group: ProcessGroup | None) -> None:
        self.group = group

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (copy_to_tp(args[0], self.group), *args[1:]), kwargs
        if "x" in kwargs:
            return args, {**kwargs, "x": copy_to_tp(kwargs["x"], self.group)}
        raise TypeError(f"{type(module).__name__} called without its input x")


__all__ = [
    "ColumnParallelCoLA",
    "ColumnParallelLinear",
    "CopyToTPHook",
    "RowParallelCoLA",
    "RowParallelLinear",
    "ShardSpec",
    "ShardedModule",
    "VocabParallelEmbedding",
    "copy_shard_",
    "sharded_parameter",
]
