"""``apply_tensor_parallel``: turn a plain ``CoLALlama`` into this rank's tensor-parallel shard, in place.

What is swapped (docs/tensor_parallel.md, "The CoLA scheme"):

=====================  ==========================  ==========================
module                 CoLA model                  full-rank model
=====================  ==========================  ==========================
q/k/v, gate/up         ``ColumnParallelCoLA``      ``ColumnParallelLinear``
o, down                ``RowParallelCoLA``         ``RowParallelLinear``
embed_tokens           ``VocabParallelEmbedding``  ``VocabParallelEmbedding``
lm_head                ``ColumnParallelLinear`` (enters the region itself, logits stay vocab-sharded)
loss_fn                ``VocabParallelCrossEntropy``
gather_logits          ``GatherLogits`` (``model(tokens)`` still returns full logits)
=====================  ==========================================================

Attention and each MLP get a forward pre-hook that enters the TP region (``copy_to_tp``) once; the
attention then runs on its local heads and SwiGLU on its local ffn shard. The shards are copied from
the plain model's weights, so ``apply_tensor_parallel(CoLALlama(args, seed=s), state)`` computes what
``CoLALlama(args, seed=s)`` does, and ``model.init_weights(s)`` afterwards gives the same weights again.
Parameter names are unchanged; the model's ``sharding`` (a ``ShardingPlan``) records how each sharded
one is cut, and ``tp_split_dims(model)`` lists their split dims for checkpoint files.
"""

from __future__ import annotations

from torch import nn

from megatron_cola.model.cola_linear import CoLALinear
from megatron_cola.model.sharding import ShardingPlan, sharding_plan
from megatron_cola.model.transformer import MLP, Attention, CoLALlama
from megatron_cola.parallel.cross_entropy import GatherLogits, VocabParallelCrossEntropy
from megatron_cola.parallel.layers import (
    ColumnParallelCoLA,
    ColumnParallelLinear,
    CopyToTPHook,
    RowParallelCoLA,
    RowParallelLinear,
    ShardedModule,
    VocabParallelEmbedding,
)
from megatron_cola.parallel.sizes import (
    check_tensor_parallel_size,
    pad_vocab_size,
)
from megatron_cola.parallel.state import ParallelState

_COLUMN = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
_ROW = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}


def _swap_column(layer: nn.Module, state: ParallelState) -> nn.Module:
    if isinstance(layer, CoLALinear):
        return ColumnParallelCoLA.from_dense(layer, state)
    if isinstance(layer, nn.Linear):
        return ColumnParallelLinear.from_dense(layer, state)
    raise TypeError(f"cannot make {type(layer).__name__} column-parallel")


def _swap_row(layer: nn.Module, state: ParallelState) -> nn.Module:
    if isinstance(layer, CoLALinear):
        return RowParallelCoLA.from_dense(layer, state)
    if isinstance(layer, nn.Linear):
        return RowParallelLinear.from_dense(layer, state)
    raise TypeError(f"cannot make {type(layer).__name__} row-parallel")


def apply_tensor_parallel(model: CoLALlama, state: ParallelState) -> CoLALlama:
    """Swap ``model``'s layers for their sharded twins (in place) and return it.

    With ``state.tp_size == 1`` the model is returned unchanged (after the size checks). Works on a
    materialised model (the shards are copied from its weights) and on one built on the meta device
    (then ``to_empty`` and ``init_weights(seed)`` as usual).
    """
    check_tensor_parallel_size(state.tp_size, model_args=model.args)
    if model.sharding.is_sharded:
        raise ValueError(f"model is already tensor-parallel (tp_size={model.sharding.tp_size})")
    if state.tp_size == 1:
        return model
    group = state.tp_group
    for block in model.layers:
        for part_name in ("self_attn", "mlp"):
            part = getattr(block, part_name)
            if not isinstance(part, (Attention, MLP)):
                raise TypeError(f"unexpected {part_name} module {type(part).__name__}")
            for name in _COLUMN[part_name]:
                setattr(part, name, _swap_column(getattr(part, name), state))
            for name in _ROW[part_name]:
                setattr(part, name, _swap_row(getattr(part, name), state))
            part.register_forward_pre_hook(CopyToTPHook(group), with_kwargs=True)
    model.embed_tokens = VocabParallelEmbedding.from_dense(model.embed_tokens, state)
    model.lm_head = ColumnParallelLinear.from_dense(model.lm_head, state, copy_input=True)
    model.loss_fn = VocabParallelCrossEntropy(group)
    model.gather_logits = GatherLogits(group)
    plan = ShardingPlan(tp_size=state.tp_size, tp_rank=state.tp_rank)
    for module_name, module in model.named_modules():
        if isinstance(module, ShardedModule):
            for local_name, spec in module.shard_specs.items():
                plan.add(f"{module_name}.{local_name}", spec)
    model.sharding = plan
    plan.mark_parameters(model)
    return model


def tp_split_dims(model: nn.Module) -> dict[str, int]:
    """``{parameter name: dim}`` of every tensor-parallel-sharded parameter (for the model files)."""
    return sharding_plan(model).split_dims()


# check_tensor_parallel_size and pad_vocab_size live in parallel/sizes.py; re-exported for older imports.
__all__ = ["apply_tensor_parallel", "check_tensor_parallel_size", "pad_vocab_size", "tp_split_dims"]
