"""Grouped projections (q/k/v and gate/up as one GEMM) agree with the plain path to 1e-5 relative in fp32,
and the weights of a model are drawn once."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.activation_memory import measure_saved_activations
from megatron_cola.model.recompute import grouped_linear


def run(args: ModelArgs, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model = CoLALlama(args, seed=seed)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    logits = model(tokens)
    loss = model(tokens, labels)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


REL_TOL = 1e-5
"""fp32 tolerance of grouped vs plain: every entry within ``REL_TOL`` times the tensor's largest entry
(grouping changes the order of the input gradient's sums, not the math; an entry-wise relative bound
would be meaningless on entries that cancel to ~0)."""


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=REL_TOL * expected.abs().max().item(), msg=msg)


@pytest.mark.parametrize("full_rank", [False, True])
@pytest.mark.parametrize("recompute", ["none", "full", "cola-m"])
def test_grouped_agrees_with_plain(full_rank: bool, recompute: str) -> None:
    if full_rank and recompute == "cola-m":
        pytest.skip("cola-m needs a CoLA model")
    args = ModelArgs.from_size(
        "debug", full_rank=full_rank, vocab_size=300, num_layers=2, recompute=recompute
    )
    ref_logits, ref_loss, ref_grads = run(args)
    logits, loss, grads = run(args.replace(grouped_projections=True))
    assert_close_rel(logits, ref_logits, "logits")
    assert_close_rel(loss, ref_loss, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_rel(grads[name], ref_grads[name], name)


def test_grouped_input_gradient_is_one_gemm() -> None:
    """Backward of a grouped projection runs one GEMM for the input gradient and one for the weight
    gradients (no per-member GEMMs), and reads the concatenated weight saved in forward."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    weights = [torch.randn(n, 16, requires_grad=True) for n in (3, 4, 5)]
    out = grouped_linear(x, weights)
    counter = CountOps((torch.ops.aten.mm.default, torch.ops.aten.cat.default))
    with counter:
        out.backward(torch.randn_like(out))
    assert counter.n == 2  # grad_x = g @ [W1; W2; W3], grad_W = g^T x; no cat in backward
    plain = torch.cat([x @ w.T for w in weights], dim=-1)
    assert_close_rel(out, plain.detach(), "out")


def test_grouped_under_bf16_autocast_as_accurate_as_plain() -> None:
    """Under bf16 autocast grouped and plain round differently (one bf16 rounding of the summed input
    gradient instead of one per member); measured against the fp32 run, grouping costs no accuracy."""
    args = ModelArgs.from_size("debug", vocab_size=300, num_layers=2)
    _, exact_loss, exact = run(args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref_loss, ref_grads = run(args)
        _, loss, grads = run(args.replace(grouped_projections=True))
    torch.testing.assert_close(loss, ref_loss)

    def err(g: torch.Tensor, name: str) -> float:
        return ((g - exact[name]).norm() / exact[name].norm()).item()

    for name in ref_grads:
        assert err(grads[name], name) <= 1.25 * err(ref_grads[name], name) + 1e-4, name


class CountOps(TorchDispatchMode):
    """Counts calls of ``ops`` on real (not meta) tensors."""

    def __init__(self, ops: tuple) -> None:
        super().__init__()
        self.ops, self.n = ops, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops and args[0].device.type != "meta":
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_grouping_runs_fewer_forward_gemms() -> None:
    def forward_mms(grouped: bool) -> int:
        args = ModelArgs.from_size("debug", vocab_size=300, num_layers=1, grouped_projections=grouped)
        model = CoLALlama(args)
        counter = CountOps((torch.ops.aten.mm.default, torch.ops.aten.addmm.default))
        with torch.no_grad(), counter:
            model(torch.randint(0, 300, (1, 8)))
        return counter.n

    # 14 GEMMs of the 7 CoLA maps + the head; grouped: q/k/v's 3 A's and gate/up's 2 A's are 2 GEMMs.
    assert forward_mms(False) - forward_mms(True) == 3


def test_grouped_cola_m_keeps_one_tensor_per_group() -> None:
    args = ModelArgs.from_size("60M", grouped_projections=True)
    d, r = args.hidden_size, args.cola_rank
    kept = measure_saved_activations(args, "cola-m", dtype=torch.float32)
    assert kept.elements_per_token == 2 * d + 7 * r
    assert kept.num_tensors == 2 + 4  # residuals; [q;k;v], o, [gate;up], down


def test_weights_drawn_once() -> None:
    """Building a model draws each weight exactly once (one ``normal_`` per matrix, no other draw)."""
    args = ModelArgs.from_size("debug", vocab_size=300, num_layers=2)
    counter = CountOps((torch.ops.aten.normal_.default, torch.ops.aten.uniform_.default))
    with counter:
        CoLALlama(args, seed=1)
    matrices = sum(1 for p in CoLALlama(args).parameters() if p.dim() == 2)
    assert counter.n == matrices


def test_checkpoint_from_before_the_speed_options_still_resumes() -> None:
    """A checkpoint whose model args predate ``grouped_projections`` / ``chunked_loss`` (or used other
    values) resumes: these fields change how the model runs, not what it computes."""
    import argparse

    from megatron_cola.config import EXECUTION_FIELDS
    from megatron_cola.errors import CheckpointError
    from megatron_cola.training.checkpointing import check_compatible

    args = ModelArgs.from_size("debug", grouped_projections=True, chunked_loss=True)
    old = {k: v for k, v in args.to_dict().items() if k not in EXECUTION_FIELDS}
    flags = argparse.Namespace(world_size=1, zero_stage=0, no_load_optim=False)
    check_compatible({"model_args": old, "args": {}}, flags, args)
    with pytest.raises(CheckpointError, match="cola_rank"):
        check_compatible({"model_args": {**old, "cola_rank": 32}, "args": {}}, flags, args)
