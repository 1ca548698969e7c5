"""Chunked linear cross-entropy: the LM head and the loss without materialising full-vocab logits.

``chunked_linear_cross_entropy(hidden, weight, labels, loss_mask)`` equals
``CrossEntropyLoss()(hidden @ weight.T, labels, loss_mask)`` (the reference path in ``layers.py``) but
runs over chunks of tokens: each chunk's logits ``(chunk, V)`` are formed, turned into the loss and the
gradients of ``hidden`` and ``weight`` right away (the logit gradient is ``softmax - onehot``), and
dropped (under ``no_grad`` only the loss is formed). Peak memory for the head is one chunk of logits
instead of ``(tokens, V)`` logits plus their fp32 copy and gradient; backward only scales the stored
gradients by the incoming one. As in the reference path the logits are formed in the autocast dtype
and the softmax is taken in fp32. Single-rank only (``LMHead(chunked=True)``): with tensor parallelism
the head is swapped for ``VocabParallelLMHead``, whose loss is vocab-parallel.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def _token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-token weight of the mean (masked) loss, as ``layers.masked_mean`` takes it."""
    if loss_mask is None:
        return torch.full(labels.shape, 1.0 / labels.numel(), device=labels.device)
    mask = loss_mask.float()
    return mask / mask.sum().clamp_min(1.0)


def _chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(loss, grad of hidden, grad of weight)``, each gradient computed only when asked for (``None``
    otherwise): an evaluation under ``no_grad`` forms the logits and the loss, nothing else."""
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    y, tw = labels.reshape(-1), token_weights.reshape(-1).float()
    w = weight.to(dtype)
    grad_h = torch.empty_like(h) if need_grad_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_grad_weight else None
    loss = torch.zeros((), dtype=torch.float32, device=device)
    with torch.autocast(device.type, enabled=False):
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start : start + chunk_size].to(dtype)  # (c, d)
            logits = (hc @ w.T).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            yc, twc = y[start : start + chunk_size], tw[start : start + chunk_size]
            ignored = yc == IGNORE_INDEX  # F.cross_entropy's default: zero loss, still in the mean
            yc, twc = yc.masked_fill(ignored, 0), twc.masked_fill(ignored, 0.0)
            loss += ((lse - logits.gather(1, yc[:, None]).squeeze(1)) * twc).sum()
            if grad_h is None and grad_w is None:
                continue
            g = torch.softmax(logits, dim=-1)  # d loss / d logits = (softmax - onehot) * token weight
            g[torch.arange(g.shape[0], device=device), yc] -= 1.0
            g = (g * twc[:, None]).to(dtype)
            if grad_h is not None:
                grad_h[start : start + chunk_size] = (g @ w).to(h.dtype)
            if grad_w is not None:
                grad_w += (g.T @ hc).float()
    return (
        loss,
        None if grad_h is None else grad_h.view_as(hidden),
        None if grad_w is None else grad_w.to(weight.dtype),
    )


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        token_weights: torch.Tensor,
        chunk_size: int,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _chunked_loss_and_grads(
            hidden, weight, labels, token_weights, chunk_size, need_h, need_w
        )
        ctx.has_grad_h, ctx.has_grad_w = grad_h is not None, grad_w is not None
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) if ctx.has_grad_h else None
        grad_w = saved.pop(0) if ctx.has_grad_w else None
        return (
            None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype),
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``hidden @ weight.T`` (fp32), optionally masked,
    computed ``chunk_size`` tokens at a time. ``hidden``: ``(..., d)``; ``weight``: ``(V, d)``;
    ``labels``/``loss_mask``: ``hidden.shape[:-1]``. Under ``no_grad`` (evaluation), or when neither
    input requires a gradient, no gradient is computed: one GEMM per chunk instead of three."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    token_weights = _token_weights(labels, loss_mask)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _chunked_loss_and_grads(hidden, weight, labels, token_weights, chunk_size, False, False)[0]
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, token_weights, chunk_size)


__all__ = ["chunked_linear_cross_entropy"]
