"""The one owner of the tensor-parallel size checks, and Megatron's vocab padding.

``check_tensor_parallel_size(tp_size, world_size=..., model_args=...)`` raises ``ConfigError`` naming
the flag that fixes the problem: ``--tensor-model-parallel-size`` against the number of processes, and
the model sizes it must divide (heads, ffn, CoLA rank, vocab). ``ParallelState``, ``apply_tensor_parallel``
and the training flags all call it.
"""

from __future__ import annotations

from megatron_cola.config import ModelArgs
from megatron_cola.errors import ConfigError


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp_size: int = 1) -> int:
    """Megatron's ``--make-vocab-size-divisible-by``: the smallest multiple of ``divisible_by * tp_size``
    that is at least ``vocab_size`` (e.g. ``pad_vocab_size(50257, 128, 2) == 50432``)."""
    if vocab_size < 1 or divisible_by < 1 or tp_size < 1:
        raise ConfigError(
            f"pad_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"divisible_by={divisible_by}, tp_size={tp_size}"
        )
    return _next_multiple(vocab_size, divisible_by * tp_size)


def _next_multiple(n: int, k: int) -> int:
    return -(-n // k) * k


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_tensor_parallel_size(
    tp_size: int,
    world_size: int | None = None,
    model_args: ModelArgs | None = None,
    scheme: str = "split-rank",
) -> None:
    """Raise ``ConfigError`` unless ``tp_size`` is a positive integer that divides ``world_size`` (when
    given) and every size of ``model_args`` that tensor parallelism splits (when given) under ``scheme``
    (``--cola-tp-scheme``: the bottleneck scheme never splits the CoLA rank)."""
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ConfigError(f"--tensor-model-parallel-size must be a positive integer, got {tp_size!r}")
    t = tp_size
    if world_size is not None and world_size % t:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {t}; "
            f"launch a multiple of {t} processes or pick a size from {_divisors(world_size)}"
        )
    if model_args is None:
        return
    args = model_args
    if args.num_attention_heads % t:
        raise ConfigError(
            f"num_attention_heads {args.num_attention_heads} is not divisible by tensor-model-parallel "
            f"size {t}; use --tensor-model-parallel-size in {_divisors(args.num_attention_heads)} "
            f"(or change --num-attention-heads)"
        )
    if not args.full_rank and scheme == "split-rank" and args.cola_rank % t:
        raise ConfigError(
            f"cola_rank {args.cola_rank} is not divisible by tensor-model-parallel size {t}; pass "
            f"--cola-rank {_next_multiple(args.cola_rank, t)} (or another multiple of {t})"
        )
    if args.ffn_hidden_size % t:
        raise ConfigError(
            f"ffn_hidden_size {args.ffn_hidden_size} is not divisible by tensor-model-parallel size {t}; "
            f"pass --ffn-hidden-size {_next_multiple(args.ffn_hidden_size, t)} (or another multiple of {t})"
        )
    if args.vocab_size % t:
        raise ConfigError(
            f"vocab_size {args.vocab_size} is not divisible by tensor-model-parallel size {t}; pad it with "
            f"--make-vocab-size-divisible-by (Megatron's padding to a multiple of that times {t}; "
            f"e.g. {pad_vocab_size(args.vocab_size, 128, t)} with 128)"
        )


__all__ = ["check_tensor_parallel_size", "pad_vocab_size"]
