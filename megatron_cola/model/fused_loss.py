"""Chunked linear cross-entropy: the LM head and the loss without materialising full-vocab logits.

``chunked_linear_cross_entropy(hidden, weight, labels, loss_mask)`` equals
``CrossEntropyLoss()(hidden @ weight.T, labels, loss_mask)`` (the reference path in ``layers.py``) but
runs over chunks of tokens: each chunk's logits ``(chunk, V)`` are formed, turned into the loss and the
gradients of ``hidden`` and ``weight`` right away (the logit gradient is ``softmax - onehot``), and
dropped. Peak memory for the head is one chunk of logits instead of ``(tokens, V)`` logits plus their
fp32 copy and gradient; backward only scales the stored gradients by the incoming one. As in the
reference path the logits are formed in the autocast dtype and the softmax is taken in fp32.
Single-rank only: with tensor parallelism the head is vocab-parallel and the model keeps its
``VocabParallelCrossEntropy``.
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
        device = hidden.device
        dtype = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        )
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        y, tw = labels.reshape(-1), token_weights.reshape(-1).float()
        w = weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device)
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
                g = torch.softmax(logits, dim=-1)  # d loss / d logits = (softmax - onehot) * token weight
                g[torch.arange(g.shape[0], device=device), yc] -= 1.0
                g = (g * twc[:, None]).to(dtype)
                grad_h[start : start + chunk_size] = (g @ w).to(h.dtype)
                grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h.view_as(hidden), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Mean next-token cross-entropy of the logits ``hidden @ weight.T`` (fp32), optionally masked,
    computed ``chunk_size`` tokens at a time. ``hidden``: ``(..., d)``; ``weight``: ``(V, d)``;
    ``labels``/``loss_mask``: ``hidden.shape[:-1]``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels, _token_weights(labels, loss_mask), chunk_size
    )


__all__ = ["chunked_linear_cross_entropy"]
