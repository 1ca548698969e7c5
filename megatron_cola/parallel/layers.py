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

Under CoLA-M both keep the r/t slice of every A output (a kept op of ``megatron_cola.model.recompute``):
q/k/v/gate/up through ``rank_projection(..., keep=True)``; o / down through
``megatron_cola::kept_linear_reduce_scatter``, the A GEMM and the reduce-scatter after it as one op, so
the reduce-scatter is not re-run in recomputation (the all-gathers of q/k/v/gate/up are).
``ColumnParallelCoLA.from_activated`` is the part after σ, so q/k/v (gate/up) can group their local A
slices into one GEMM (``megatron_cola.model.cola_linear.project_shared_input``).

``ColumnParallelLinear`` / ``RowParallelLinear``: Megatron's dense scheme for the full-rank model.
``VocabParallelEmbedding``: rows split, masked lookup, all-reduce. ``VocabParallelLMHead``: the head
and its vocab-parallel cross-entropy (every scheme). The bottleneck scheme's twins are in
``parallel/bottleneck.py``.

Parameters keep the plain model's names (``weight_a``, ``weight_b``, ``weight``). Each twin declares
how its parameters are cut (``shard_specs``: local name -> ``ShardSpec``); ``apply_tensor_parallel``
records them in the model's ``ShardingPlan``, which ``CoLALlama.init_weights`` and checkpoint code read
(nothing is patched onto the parameters but DeepSpeed's ``tensor_model_parallel`` flag, written from the
plan). ``in_features``, ``out_features`` and ``rank`` are the full (unsharded) sizes; ``*_local`` the
shard's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megatron_cola.model.cola_linear import CoLALinear, cola_init_std, get_activation
from megatron_cola.model.layers import masked_mean
from megatron_cola.model.recompute import (
    A_GEMM_RANGE,
    autocast_inputs,
    linear_grads,
    rank_projection,
    register_kept_op,
)
from megatron_cola.model.sharding import ShardSpec
from megatron_cola.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_cola.parallel.mappings import (
    all_gather_last_dim,
    all_gather_last_dim_raw,
    copy_to_tp,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_scatter_last_dim_raw,
    reduce_scatter_to_tp_last_dim,
)
from megatron_cola.parallel.state import ParallelState


def divide_evenly(n: int, t: int, what: str) -> int:
    """``n / t``, or ``ValueError`` naming ``what`` when ``t`` does not divide it."""
    if n % t:
        raise ValueError(f"{what} {n} is not divisible by tensor-model-parallel size {t}")
    return n // t


def group_by_name(name: str) -> ProcessGroup:
    """The process group called ``name`` (custom ops take groups by name: ``torch.compile`` cannot
    trace a group object)."""
    return torch.distributed.distributed_c10d._resolve_process_group(name)


@torch.library.custom_op("megatron_cola::kept_linear_reduce_scatter", mutates_args=())
def _kept_linear_reduce_scatter(
    x: torch.Tensor, weight: torch.Tensor, group_name: str, tp_size: int
) -> torch.Tensor:
    """``reduce_scatter_last_dim(F.linear(x, weight))``: a row-parallel A and the reduce-scatter of its
    partial sums, one op kept by CoLA-M (``register_kept_op``)."""
    with torch.profiler.record_function(A_GEMM_RANGE):
        partial = F.linear(x, weight)  # (..., r): partial sum over the input shards
    return reduce_scatter_last_dim_raw(partial, group_by_name(group_name), "forward")  # (..., r/t)


@_kept_linear_reduce_scatter.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, group_name: str, tp_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] // tp_size))


@torch.library.custom_op("megatron_cola::all_gather_last_dim", mutates_args=())
def _all_gather_last_dim_op(x: torch.Tensor, group_name: str, tp_size: int) -> torch.Tensor:
    """The kept op's backward all-gather, opaque to ``torch.compile`` (a traced one would put the process
    group object into the compiled backward graph, which cannot be copied)."""
    return all_gather_last_dim_raw(x, group_by_name(group_name), "backward")


@_all_gather_last_dim_op.register_fake
def _(x: torch.Tensor, group_name: str, tp_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] * tp_size))


def _setup_kept_rs(
    ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor, str, int], output: torch.Tensor
) -> None:
    x, weight, ctx.group_name, ctx.tp_size = inputs
    ctx.save_for_backward(x, weight)


def _kept_rs_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    grad = torch.ops.megatron_cola.all_gather_last_dim(grad, ctx.group_name, ctx.tp_size)  # (..., r)
    return (*linear_grads(ctx.needs_input_grad, x, weight, grad), None, None)


_kept_linear_reduce_scatter.register_autograd(_kept_rs_backward, setup_context=_setup_kept_rs)
register_kept_op(torch.ops.megatron_cola.kept_linear_reduce_scatter.default)


class ShardedModule(nn.Module):
    """Base of the sharded twins: creates each shard-shaped parameter and declares how it is cut.

    ``shard_specs`` maps each local parameter name to its ``ShardSpec``; ``apply_tensor_parallel``
    copies these into the model's ``ShardingPlan`` under the full parameter names. Nothing is attached
    to the parameters themselves.
    """

    def __init__(self) -> None:
        super().__init__()
        self.shard_specs: dict[str, ShardSpec] = {}

    def _add_sharded(
        self,
        name: str,
        full_shape: tuple[int, ...],
        dim: int,
        state: ParallelState,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> nn.Parameter:
        divide_evenly(full_shape[dim], state.tp_size, f"dim {dim} of {full_shape}")
        spec = ShardSpec(tuple(full_shape), dim, state.tp_size, state.tp_rank)
        self.shard_specs[name] = spec
        param = nn.Parameter(torch.empty(spec.local_shape, device=device, dtype=dtype))
        self.register_parameter(name, param)
        return param

    @torch.no_grad()
    def copy_shards_from(self, dense: nn.Module) -> None:
        """Fill each sharded parameter with its shard of ``dense``'s full tensor of the same name
        (skipped on the meta device: nothing to copy)."""
        for name, spec in self.shard_specs.items():
            full, param = getattr(dense, name), getattr(self, name)
            if param.device.type != "meta" and full.device.type != "meta":
                param.copy_(spec.shard(full))


class _ShardedCoLA(ShardedModule):
    """What the two tensor-parallel CoLA maps share: their construction from a dense ``CoLALinear`` and the
    reference init scale of the full map."""

    in_features: int
    out_features: int
    rank: int

    @classmethod
    def from_dense(cls, layer: CoLALinear, state: ParallelState) -> _ShardedCoLA:
        if layer.bias is not None:
            raise ValueError("tensor-parallel CoLA layers support bias=False only (CoLA models use none)")
        w = layer.weight_a
        twin = cls(  # type: ignore[call-arg]  (both subclasses take these arguments)
            layer.in_features,
            layer.out_features,
            layer.rank,
            state,
            layer.activation,
            layer.keep_a_output,
            w.device,
            w.dtype,
        )
        twin.copy_shards_from(layer)
        return twin

    @property
    def init_std(self) -> float:
        return cola_init_std(self.in_features, self.out_features, self.rank)


class ColumnParallelCoLA(_ShardedCoLA):
    """CoLA map whose output is sharded: A over r, all-gather at the bottleneck, B over the output."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        state: ParallelState,
        activation: str = "silu",
        keep_a_output: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.keep_a_output = keep_a_output
        self.tp_size = state.tp_size
        self.rank_local = divide_evenly(rank, state.tp_size, "cola_rank")
        self.out_features_local = divide_evenly(out_features, state.tp_size, "out_features")
        self.activation = activation
        self.act_fn = get_activation(activation)
        self.group = state.tp_group
        self._add_sharded("weight_a", (rank, in_features), 0, state, device, dtype)  # (r/t, d_in)
        self._add_sharded("weight_b", (out_features, rank), 0, state, device, dtype)  # (d_out/t, r)

    def from_rank(self, a: torch.Tensor) -> torch.Tensor:
        """After A: σ on the local rank slice, all-gather, B: ``(..., r/t) -> (..., d_out/t)``."""
        return self.from_activated(self.act_fn(a))

    def from_activated(self, s: torch.Tensor) -> torch.Tensor:
        """After σ: all-gather the rank slices, B: ``(..., r/t) -> (..., d_out/t)``."""
        return F.linear(all_gather_last_dim(s, self.group), self.weight_b)  # (..., r) -> (..., d_out/t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in), replicated; the caller entered the TP region (copy_to_tp) once for q/k/v.
        a = rank_projection(x, (self.weight_a,), keep=self.keep_a_output)  # (..., r/t): kept by CoLA-M
        return self.from_rank(a)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.out_features_local}), rank={self.rank} (local {self.rank_local}), "
            f"activation={self.activation}, tp_size={self.tp_size}"
        )


class RowParallelCoLA(_ShardedCoLA):
    """CoLA map whose input is sharded: A over the input, reduce-scatter at the bottleneck, B over r."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        state: ParallelState,
        activation: str = "silu",
        keep_a_output: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.keep_a_output = keep_a_output
        self.tp_size = state.tp_size
        self.rank_local = divide_evenly(rank, state.tp_size, "cola_rank")
        self.in_features_local = divide_evenly(in_features, state.tp_size, "in_features")
        self.activation = activation
        self.act_fn = get_activation(activation)
        self.group = state.tp_group
        self._add_sharded("weight_a", (rank, in_features), 1, state, device, dtype)  # (r, d_in/t)
        self._add_sharded("weight_b", (out_features, rank), 1, state, device, dtype)  # (d_out, r/t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_in/t), this rank's heads / ffn shard.
        # A's output is a partial sum over the input shards (..., r); reduce-scatter it onto the rank
        # slices (..., r/t). Under CoLA-M both happen inside one kept op, so CoLA-M keeps the r/t slice
        # and the reduce-scatter is not re-run in recomputation.
        if self.keep_a_output and self.tp_size > 1:
            x, w = autocast_inputs(x, self.weight_a)
            group_name = self.group.group_name
            a = torch.ops.megatron_cola.kept_linear_reduce_scatter(
                x, w, group_name, self.tp_size
            )  # (..., r/t)
        elif self.keep_a_output:
            a = rank_projection(x, (self.weight_a,), keep=True)
        else:
            a = reduce_scatter_to_tp_last_dim(rank_projection(x, (self.weight_a,)), self.group)  # (..., r/t)
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

    q/k/v and gate/up leave entering the TP region to their shared entry point (``CopyToTPHook``), so
    the input gradient is all-reduced once.
    """

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
        self.out_features_local = divide_evenly(out_features, state.tp_size, "out_features")
        self.group = state.tp_group
        self._add_sharded("weight", (out_features, in_features), 0, state, device, dtype)  # (out/t, in)

    @classmethod
    def from_dense(cls, layer: nn.Linear, state: ParallelState) -> ColumnParallelLinear:
        if layer.bias is not None:
            raise ValueError("tensor-parallel linear layers support bias=False only")
        w = layer.weight
        twin = cls(layer.in_features, layer.out_features, state, w.device, w.dtype)
        twin.copy_shards_from(layer)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., out/t)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.out_features_local}), tp_size={self.tp_size}"
        )


class VocabParallelLMHead(ShardedModule):
    """The LM head and its loss with the vocab (rows of ``W``) split: the twin of ``model.layers.LMHead``.

    The hidden state enters replicated (``copy_to_tp``: its gradient is all-reduced) or, with
    ``gather_input`` (the bottleneck scheme, whose hidden state is sharded on d), as this rank's
    ``d/t`` slice, all-gathered (its gradient reduce-scattered). ``head(hidden)`` returns full logits
    ``(..., V)`` (all-gathered over the vocab); ``head.loss(hidden, labels, loss_mask)`` the mean fp32
    loss by vocab-parallel cross-entropy, without full-vocab logits on any rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        state: ParallelState,
        gather_input: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_size = state.tp_size
        self.out_features_local = divide_evenly(out_features, state.tp_size, "vocab_size")
        self.gather_input = gather_input
        self.group = state.tp_group
        self._add_sharded("weight", (out_features, in_features), 0, state, device, dtype)  # (V/t, d)

    @classmethod
    def from_dense(
        cls, layer: nn.Linear, state: ParallelState, gather_input: bool = False
    ) -> VocabParallelLMHead:
        if layer.bias is not None:
            raise ValueError("the tensor-parallel LM head supports bias=False only")
        w = layer.weight
        twin = cls(layer.in_features, layer.out_features, state, gather_input, w.device, w.dtype)
        twin.copy_shards_from(layer)
        return twin

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocab shard of the logits, ``(..., V/t)``."""
        if self.gather_input:
            hidden = all_gather_last_dim(hidden, self.group)  # (..., d/t) -> (..., d)
        else:
            hidden = copy_to_tp(hidden, self.group)
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_from_tp_last_dim(self.local_logits(hidden), self.group)  # (..., V)

    def loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        losses = vocab_parallel_cross_entropy(self.local_logits(hidden), labels, self.group)
        return masked_mean(losses, loss_mask)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} "
            f"(local {self.out_features_local}), tp_size={self.tp_size}, gather_input={self.gather_input}"
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
        self.in_features_local = divide_evenly(in_features, state.tp_size, "in_features")
        self.group = state.tp_group
        self._add_sharded("weight", (out_features, in_features), 1, state, device, dtype)  # (out, in/t)

    @classmethod
    def from_dense(cls, layer: nn.Linear, state: ParallelState) -> RowParallelLinear:
        if layer.bias is not None:
            raise ValueError("tensor-parallel linear layers support bias=False only")
        w = layer.weight
        twin = cls(layer.in_features, layer.out_features, state, w.device, w.dtype)
        twin.copy_shards_from(layer)
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
        self.num_embeddings_local = divide_evenly(num_embeddings, state.tp_size, "vocab_size")
        self.vocab_start = state.tp_rank * self.num_embeddings_local
        self.group = state.tp_group
        self._add_sharded("weight", (num_embeddings, embedding_dim), 0, state, device, dtype)  # (V/t, d)

    @classmethod
    def from_dense(cls, layer: nn.Embedding, state: ParallelState) -> VocabParallelEmbedding:
        w = layer.weight
        twin = cls(layer.num_embeddings, layer.embedding_dim, state, w.device, w.dtype)
        twin.copy_shards_from(layer)
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
    "ShardedModule",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "divide_evenly",
    "group_by_name",
]
