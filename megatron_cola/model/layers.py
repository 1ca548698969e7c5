"""Small building blocks: RMSNorm, rotary position embedding, the LM head and its cross-entropy loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cola.model.fused_loss import chunked_linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (``torch.nn.functional.rms_norm``)."""

    init_ones = True  # ``CoLALlama.init_weights`` starts the scale at 1 (so do sharded twins that say so)

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(seq_len, head_dim)`` in the Hugging Face LLaMA (rotate-half) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``(B, nh, T, hs)`` by the tables ``(T, hs)``."""
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


class CrossEntropyLoss(nn.Module):
    """Mean next-token cross-entropy in fp32, optionally masked (the reference loss of ``LMHead``)."""

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        ).view_as(labels)
        return masked_mean(losses, loss_mask)


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)


class LMHead(nn.Linear):
    """The output layer and the loss it feeds: ``head(hidden)`` gives logits ``(..., V)``,
    ``head.loss(hidden, labels, loss_mask)`` the mean next-token loss (fp32).

    With ``chunked`` the loss runs a chunk of tokens at a time without full-vocab logits
    (``chunked_linear_cross_entropy``). Tensor parallelism replaces the whole head, loss included, with
    its vocab-parallel twin (``megatron_cola.parallel.VocabParallelLMHead``), so the model never knows
    how its logits are laid out.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        chunked: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.chunked = chunked

    def loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.chunked:
            return chunked_linear_cross_entropy(hidden, self.weight, labels, loss_mask)
        return CrossEntropyLoss()(self(hidden), labels, loss_mask)
