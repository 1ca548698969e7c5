"""Recomputation: ``full`` and ``cola-m`` give the same loss and gradients as ``none`` (bitwise: the same
ops run, in the same order), and keep less."""

from __future__ import annotations

import pytest
import torch

from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.activation_memory import measure_saved_activations


def loss_and_grads(args: ModelArgs, seed: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = CoLALlama(args, seed=seed)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    loss = model(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(loss: torch.Tensor, grads: dict, ref_loss: torch.Tensor, ref_grads: dict) -> None:
    assert torch.equal(loss, ref_loss)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("mode", ["full", "cola-m"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"gate_activation": False}, {"grouped_projections": True}],
    ids=["plain", "no-gate-act", "grouped"],
)
def test_recompute_matches_no_recompute(mode: str, overrides: dict) -> None:
    base = ModelArgs.from_size("debug", vocab_size=300, num_layers=2, **overrides)
    assert_same(*loss_and_grads(base.replace(recompute=mode)), *loss_and_grads(base))


def test_full_recompute_for_full_rank_matches() -> None:
    base = ModelArgs.from_size("debug", full_rank=True, vocab_size=300, num_layers=2)
    assert_same(*loss_and_grads(base.replace(recompute="full")), *loss_and_grads(base))


@pytest.mark.parametrize("grouped", [False, True])
def test_cola_m_under_bf16_autocast_matches(grouped: bool) -> None:
    base = ModelArgs.from_size("debug", vocab_size=300, num_layers=2, grouped_projections=grouped)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(base)
        out = loss_and_grads(base.replace(recompute="cola-m"))
    assert_same(*out, *ref)


def test_cola_m_keeps_2d_plus_7r() -> None:
    args = ModelArgs.from_size("60M")
    d, r = args.hidden_size, args.cola_rank
    kept = measure_saved_activations(args, "cola-m", dtype=torch.float32)
    assert kept.elements_per_token == 2 * d + 7 * r
    assert kept.num_tensors == 9
    assert kept.bytes_per_token == 4 * (2 * d + 7 * r)
    none = measure_saved_activations(args, "none", dtype=torch.float32)
    full = measure_saved_activations(args, "full", dtype=torch.float32)
    assert full.elements_per_token == d  # only the block input
    assert none.elements_per_token > 4 * kept.elements_per_token


@pytest.mark.parametrize("grouped", [False, True])
def test_cola_m_does_not_recompute_a_gemms(grouped: bool) -> None:
    """Backward under CoLA-M runs exactly the GEMMs of backward without recompute, plus the forward B
    GEMMs of the recomputed region; the kept A projections (an op each, whose GEMM the dispatcher does
    not show separately) are served from the checkpoint's cache."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gemms = (
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.megatron_cola.kept_linear.default,
    )

    class CountMM(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in gemms:
                self.mm += 1
            return func(*args, **(kwargs or {}))

    def backward_mms(mode: str) -> int:
        args = ModelArgs.from_size(
            "debug", vocab_size=300, num_layers=1, recompute=mode, grouped_projections=grouped
        )
        model = CoLALlama(args)
        tokens = torch.randint(0, 300, (1, 8))
        loss = model(tokens, tokens)
        counter = CountMM()
        with counter:
            loss.backward()
        return counter.mm

    none, colam, full = backward_mms("none"), backward_mms("cola-m"), backward_mms("full")
    # 7 CoLALinear per layer = 14 forward GEMMs (11 when q/k/v and gate/up A's are grouped). Whole-block
    # recompute redoes all but the last (down's B: the checkpoint stops early once every saved input is
    # rebuilt). CoLA-M redoes only the B GEMMs whose outputs backward needs: q, k, v (attention) and
    # gate, up (the product); never an A GEMM.
    assert full - none == (10 if grouped else 13)
    assert colam - none == 5


def test_cola_m_recomputation_may_run_extra_ops() -> None:
    """ZeRO-3 gathers a parameter inside a region whenever it finds it released, so a recomputation can
    run ops its forward did not; CoLA-M only needs the kept ops to line up (torch's stock selective
    checkpoint raises "not found in storage" here)."""
    args = ModelArgs.from_size("debug", vocab_size=300, num_layers=1)
    ref_loss, ref_grads = loss_and_grads(args)
    model = CoLALlama(args.replace(recompute="cola-m"), seed=3)
    seen = []

    def gather_when_released(module: torch.nn.Module, inputs: tuple) -> None:
        if seen:  # the recomputation "gathers" (outside autograd, GEMMs and copies forward did not run)
            with torch.no_grad():
                w = module.o_proj.weight_a
                torch.mm(w, w.T).clone()
        seen.append(True)

    model.layers[0].self_attn.register_forward_pre_hook(gather_when_released)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.roll(tokens, -1, dims=1))
    loss.backward()
    assert len(seen) == 2
    assert_same(loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ref_loss, ref_grads)
