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


def _loss_and_flops(hidden, weight, labels) -> tuple[torch.Tensor, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    return loss, counter.get_total_flops()


def test_chunked_loss_skips_gradient_work_without_grad() -> None:
    """An evaluation (``no_grad``) forms only the logits GEMM per chunk (2 N d V FLOPs), not the two
    gradient GEMMs as well, and gives the same loss; a frozen weight skips its gradient GEMM."""
    gen = torch.Generator().manual_seed(0)
    n, d, v = 24, 32, 97
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=gen)
    train_loss, train_flops = _loss_and_flops(hidden, weight, labels)
    assert train_flops == 3 * 2 * n * d * v
    with torch.no_grad():
        eval_loss, eval_flops = _loss_and_flops(hidden, weight, labels)
    assert eval_flops == 2 * n * d * v
    assert not eval_loss.requires_grad
    assert torch.equal(eval_loss, train_loss.detach())
    frozen = weight.detach()
    loss, flops = _loss_and_flops(hidden, frozen, labels)
    assert flops == 2 * 2 * n * d * v
    (grad,) = torch.autograd.grad(loss, hidden)
    (ref,) = torch.autograd.grad(train_loss, hidden)
    assert torch.equal(grad, ref)
