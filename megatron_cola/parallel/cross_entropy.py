"""Vocab-parallel cross-entropy: no rank ever holds full-vocab logits for the loss (``VocabParallelLMHead``).

Each rank holds logits ``(..., V/t)`` for the vocab ids ``[i V/t, (i+1) V/t)``. The loss per token is
``log Σ_v exp(z_v - m) - (z_label - m)`` with ``m`` the max logit; it takes two all-reduces of a few
fp32 numbers per token: the max (``MAX``), then the target logit and the sum of exponentials stacked
into one (``SUM``). The gradient ``softmax - onehot(label)`` is local. Labels equal to ``-100`` (the
ignore index of ``torch.nn.functional.cross_entropy``) give loss 0 and no gradient, as in the dense loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_cola.parallel.mappings import all_reduce, group_rank

IGNORE_INDEX = -100


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
        z = logits.float()  # (..., V/t)
        m = all_reduce(z.max(dim=-1).values, group, "forward", op=dist.ReduceOp.MAX)  # (...)
        z = z - m.unsqueeze(-1)  # (..., V/t), a fresh tensor: safe to exponentiate in place below
        local = labels - start
        owned = (local >= 0) & (local < v_local)
        local = local.masked_fill(~owned, 0)
        target = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)  # (...)
        exp = z.exp_()
        sums = all_reduce(torch.stack((target, exp.sum(dim=-1))), group, "forward")  # (2, ...)
        target, sum_exp = sums[0], sums[1]
        ignored = labels == IGNORE_INDEX
        loss = (torch.log(sum_exp) - target).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # (..., V/t)
        ctx.save_for_backward(softmax, local, owned, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local, owned, ignored = ctx.saved_tensors
        grad = softmax.clone()  # (..., V/t)
        grad.scatter_add_(-1, local.unsqueeze(-1), -owned.to(grad.dtype).unsqueeze(-1))
        scale = grad_loss.float().masked_fill(ignored, 0.0).unsqueeze(-1)
        return (grad * scale).to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, group: ProcessGroup | None
) -> torch.Tensor:
    """Per-token fp32 losses (shape of ``labels``) from vocab-sharded ``logits`` ``(..., V/t)``."""
    return _VocabParallelCrossEntropy.apply(logits, labels, group)


__all__ = ["vocab_parallel_cross_entropy"]
