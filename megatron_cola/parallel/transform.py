"""``apply_tensor_parallel``: turn a plain ``CoLALlama`` into this rank's tensor-parallel shard, in place.

What is swapped (docs/tensor_parallel.md, "The scheme"):

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
Parameter names are unchanged; ``tp_split_dims(model)`` lists the sharded ones for checkpoint files.
"""

from __future__ import annotations

from torch import nn

from megatron_cola.config import ModelArgs
from megatron_cola.model.cola_linear import CoLALinear
from megatron_cola.model.transformer import MLP, Attention, CoLALlama
from megatron_cola.parallel.cross_entropy import GatherLogits, VocabParallelCrossEntropy
from megatron_cola.parallel.layers import (
    ColumnParallelCoLA,
    ColumnParallelLinear,
    CopyToTPHook,
    RowParallelCoLA,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_cola.parallel.state import ParallelState

_COLUMN = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
_ROW = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's ``--make-vocab-size-divisible-by``: the smallest multiple of ``divisible_by * tp_size``
    that is at least ``vocab_size`` (e.g. ``pad_vocab_size(50257, 128, 2) == 50432``)."""
    if vocab_size < 1 or divisible_by < 1 or tp_size < 1:
        raise ValueError(
            f"pad_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"divisible_by={divisible_by}, tp_size={tp_size}"
        )
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def _next_multiple(n: int, k: int) -> int:
    return -(-n // k) * k


def check_tensor_parallel_sizes(args: ModelArgs, tp_size: int) -> None:
    """Raise ``ValueError`` (naming the flag that fixes it) if ``args`` cannot be split ``tp_size`` ways."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"--tensor-model-parallel-size must be a positive integer, got {tp_size!r}")
    t = tp_size
    if args.num_attention_heads % t:
        divisors = [k for k in range(1, args.num_attention_heads + 1) if args.num_attention_heads % k == 0]
        raise ValueError(
            f"num_attention_heads {args.num_attention_heads} is not divisible by tensor-model-parallel "
            f"size {t}; use --tensor-model-parallel-size in {divisors} (or change --num-attention-heads)"
        )
    if not args.full_rank and args.cola_rank % t:
        raise ValueError(
            f"cola_rank {args.cola_rank} is not divisible by tensor-model-parallel size {t}; pass "
            f"--cola-rank {_next_multiple(args.cola_rank, t)} (or another multiple of {t})"
        )
    if args.ffn_hidden_size % t:
        raise ValueError(
            f"ffn_hidden_size {args.ffn_hidden_size} is not divisible by tensor-model-parallel size {t}; "
            f"pass --ffn-hidden-size {_next_multiple(args.ffn_hidden_size, t)} (or another multiple of {t})"
        )
    if args.vocab_size % t:
        raise ValueError(
            f"vocab_size {args.vocab_size} is not divisible by tensor-model-parallel size {t}; pad it with "
            f"--make-vocab-size-divisible-by (Megatron's padding to a multiple of that times {t}; "
            f"e.g. {pad_vocab_size(args.vocab_size, 128, t)} with 128)"
        )


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
    check_tensor_parallel_sizes(model.args, state.tp_size)
    if getattr(model, "tp_size", 1) != 1:
        raise ValueError(f"model is already tensor-parallel (tp_size={model.tp_size})")
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
    model.tp_size = state.tp_size
    model.tp_rank = state.tp_rank
    return model


def tp_split_dims(model: nn.Module) -> dict[str, int]:
    """``{parameter name: dim}`` of every tensor-parallel-sharded parameter (for the model files)."""
    return {name: int(p.tp_split_dim) for name, p in model.named_parameters() if hasattr(p, "tp_split_dim")}


__all__ = [
    "apply_tensor_parallel",
    "check_tensor_parallel_sizes",
    "pad_vocab_size",
    "tp_split_dims",
]
