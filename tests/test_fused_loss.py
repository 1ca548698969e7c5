"""The chunked linear cross-entropy equals the reference head + loss (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.fused_loss import chunked_linear_cross_entropy
from megatron_cola.model.layers import CrossEntropyLoss


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_chunked_loss_equals_reference(masked: bool, chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 13, 32, generator=gen, requires_grad=True)
    weight = torch.randn(97, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 97, (2, 13), generator=gen)
    labels[0, 3] = -100  # ignored, as F.cross_entropy does by default
    mask = (torch.rand(2, 13, generator=gen) > 0.3).float() if masked else None
    ref = CrossEntropyLoss()(hidden @ weight.T, labels, mask)
    ref_grads = torch.autograd.grad(ref * 3.0, (hidden, weight))
    loss = chunked_linear_cross_entropy(hidden, weight, labels, mask, chunk_size=chunk)
    grads = torch.autograd.grad(loss * 3.0, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_model_with_chunked_loss_matches() -> None:
    args = ModelArgs.from_size("debug", vocab_size=300, num_layers=1)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for chunked in (False, True):
        model = CoLALlama(args.replace(chunked_loss=chunked), seed=2)
        loss = model(tokens, torch.roll(tokens, -1, 1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_under_bf16_autocast_close() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=gen)
    weight = torch.randn(97, 32, generator=gen) * 0.1
    labels = torch.randint(0, 97, (64,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = CrossEntropyLoss()(torch.nn.functional.linear(hidden, weight), labels)
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=16)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
