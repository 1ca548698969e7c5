"""Analytic FLOP counts (a multiply-add is 2 FLOPs), used by model_info and for MFU in training logs."""

from __future__ import annotations

from megatron_cola.config import ModelArgs


def forward_matmul_flops_per_token(args: ModelArgs) -> int:
    """Forward FLOPs of every weight matmul per token: the blocks' linear maps and the LM head."""
    per_layer = 0
    for d_in, d_out in args.linear_shapes().values():
        per_layer += 2 * (d_in * d_out if args.full_rank else args.cola_rank * (d_in + d_out))
    return args.num_layers * per_layer + 2 * args.hidden_size * args.vocab_size


def forward_attention_flops_per_token(args: ModelArgs, seq_length: int) -> int:
    """Forward FLOPs of ``QK^T`` and ``softmax(.)V`` per token, counting the full (non-causal) square
    as Megatron and PaLM's MFU formulas do."""
    return args.num_layers * 2 * 2 * seq_length * args.hidden_size


def training_flops_per_token(args: ModelArgs, seq_length: int) -> int:
    """Forward + backward (3× forward) matmul and attention FLOPs per token, without recomputation."""
    return 3 * (forward_matmul_flops_per_token(args) + forward_attention_flops_per_token(args, seq_length))
