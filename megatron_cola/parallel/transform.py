"""``apply_tensor_parallel``: turn a plain ``CoLALlama`` into this rank's tensor-parallel shard, in place.

What is swapped (docs/tensor_parallel.md), by scheme (``effective_scheme``):

==================  =====================  =========================  ==========================
module              split-rank (CoLA)      bottleneck (CoLA)          dense (full rank, any flag)
==================  =====================  =========================  ==========================
q/k/v, gate/up      ``ColumnParallelCoLA`` ``BottleneckCoLA`` (norm)  ``ColumnParallelLinear``
o, down             ``RowParallelCoLA``    ``BottleneckCoLA``         ``RowParallelLinear``
block norms         replicated             ``DeferredRMSNorm``        replicated
final norm          replicated             ``ShardedRMSNorm``         replicated
embed_tokens        ``VocabParallelEmbedding`` / ``HiddenShardedEmbedding`` (bottleneck: split on d)
lm_head             ``VocabParallelLMHead`` (head and vocab-parallel loss; bottleneck: gathers d)
==================  ==============================================================================

Under split-rank and dense TP, attention and each MLP get a forward pre-hook that enters the TP region
(``copy_to_tp``) once. The shards are copied from the plain model's weights, so
``apply_tensor_parallel(CoLALlama(args, seed=s), state)`` computes what ``CoLALlama(args, seed=s)``
does, and ``model.init_weights(s)`` afterwards gives the same weights again. Parameter names are
unchanged; the model's ``sharding`` (a ``ShardingPlan``) records how each one is cut and the scheme.
"""

from __future__ import annotations

from torch import nn

from megatron_cola.config import DEFAULT_TP_SCHEME, TP_SCHEMES, ModelArgs
from megatron_cola.model.cola_linear import CoLALinear
from megatron_cola.model.layers import RMSNorm
from megatron_cola.model.sharding import ShardingPlan, sharding_plan
from megatron_cola.model.transformer import MLP, Attention, CoLALlama
from megatron_cola.parallel.bottleneck import (
    BottleneckCoLA,
    DeferredRMSNorm,
    HiddenShardedEmbedding,
    ShardedRMSNorm,
)
from megatron_cola.parallel.layers import (
    ColumnParallelCoLA,
    ColumnParallelLinear,
    CopyToTPHook,
    RowParallelCoLA,
    RowParallelLinear,
    ShardedModule,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)
from megatron_cola.parallel.sizes import check_tensor_parallel_size
from megatron_cola.parallel.state import ParallelState

_COLUMN = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
_ROW = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}
_NORM_BEFORE = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}


def effective_scheme(model_args: ModelArgs, scheme: str = DEFAULT_TP_SCHEME) -> str:
    """The scheme tensor parallelism applies to a model of ``model_args`` when asked for ``scheme``
    (``--cola-tp-scheme``): ``"dense"`` for full-rank models whatever was asked, else ``scheme``."""
    if scheme not in TP_SCHEMES:
        raise ValueError(f"unknown tensor-parallel scheme {scheme!r}; allowed: {list(TP_SCHEMES)}")
    return "dense" if model_args.full_rank else scheme


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


def _swap_bottleneck(layer: nn.Module, state: ParallelState, norm_eps: float | None) -> BottleneckCoLA:
    if not isinstance(layer, CoLALinear):
        raise TypeError(f"the bottleneck scheme needs CoLA layers, got {type(layer).__name__}")
    return BottleneckCoLA.from_dense(layer, state, norm_eps)


def _megatron_block(block: nn.Module, state: ParallelState) -> None:
    """split-rank and dense: the residual stream replicated, the maps split, one region entry per half."""
    for part_name in ("self_attn", "mlp"):
        part = getattr(block, part_name)
        for name in _COLUMN[part_name]:
            setattr(part, name, _swap_column(getattr(part, name), state))
        for name in _ROW[part_name]:
            setattr(part, name, _swap_row(getattr(part, name), state))
        part.register_forward_pre_hook(CopyToTPHook(state.tp_group), with_kwargs=True)


def _bottleneck_block(block: nn.Module, state: ParallelState) -> None:
    """bottleneck: the residual stream sharded on d; each norm is finished by the maps it feeds."""
    for part_name in ("self_attn", "mlp"):
        part = getattr(block, part_name)
        norm = getattr(block, _NORM_BEFORE[part_name])
        if not isinstance(norm, RMSNorm):
            raise TypeError(f"unexpected norm {type(norm).__name__} before {part_name}")
        setattr(block, _NORM_BEFORE[part_name], DeferredRMSNorm.from_dense(norm, state))
        for name in _COLUMN[part_name]:
            setattr(part, name, _swap_bottleneck(getattr(part, name), state, norm.eps))
        for name in _ROW[part_name]:
            setattr(part, name, _swap_bottleneck(getattr(part, name), state, None))


def apply_tensor_parallel(
    model: CoLALlama, state: ParallelState, scheme: str = DEFAULT_TP_SCHEME
) -> CoLALlama:
    """Swap ``model``'s layers for their sharded twins under ``scheme`` (in place) and return it.

    ``scheme`` is ``--cola-tp-scheme`` (``config.TP_SCHEMES``); full-rank models use Megatron's dense
    TP whatever it says (``effective_scheme``). With ``state.tp_size == 1`` the model is returned
    unchanged (after the size checks). Works on a materialised model (the shards are copied from its
    weights) and on one built on the meta device (then ``to_empty`` and ``init_weights(seed)``).
    """
    used = effective_scheme(model.args, scheme)
    check_tensor_parallel_size(state.tp_size, model_args=model.args, scheme=scheme)
    if model.sharding.is_sharded:
        raise ValueError(f"model is already tensor-parallel (tp_size={model.sharding.tp_size})")
    if state.tp_size == 1:
        return model
    for block in model.layers:
        for part_name, kind in (("self_attn", Attention), ("mlp", MLP)):
            if not isinstance(getattr(block, part_name), kind):
                raise TypeError(f"unexpected {part_name} module {type(getattr(block, part_name)).__name__}")
        if used == "bottleneck":
            _bottleneck_block(block, state)
        else:
            _megatron_block(block, state)
    if used == "bottleneck":
        model.embed_tokens = HiddenShardedEmbedding.from_dense(model.embed_tokens, state)
        model.norm = ShardedRMSNorm.from_dense(model.norm, state)
    else:
        model.embed_tokens = VocabParallelEmbedding.from_dense(model.embed_tokens, state)
    model.lm_head = VocabParallelLMHead.from_dense(model.lm_head, state, gather_input=used == "bottleneck")
    plan = ShardingPlan(tp_size=state.tp_size, tp_rank=state.tp_rank, scheme=used)
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


__all__ = ["apply_tensor_parallel", "effective_scheme", "tp_split_dims"]
