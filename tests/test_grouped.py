"""Grouped projections (q/k/v and gate/up as one GEMM) equal the plain path bitwise in fp32, and the
weights of a model are drawn once."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.activation_memory import measure_saved_activations


def run(args: ModelArgs, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model = CoLALlama(args, seed=seed)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    logits = model(tokens)
    loss = model(tokens, labels)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("full_rank", [False, True])
@pytest.mark.parametrize("recompute", ["none", "full", "cola-m"])
def test_grouped_equals_plain_bitwise(full_rank: bool, recompute: str) -> None:
    if full_rank and recompute == "cola-m":
        pytest.skip("cola-m needs a CoLA model")
    args = ModelArgs.from_size(
        "debug", full_rank=full_rank, vocab_size=300, num_layers=2, recompute=recompute
    )
    ref_logits, ref_loss, ref_grads = run(args)
    logits, loss, grads = run(args.replace(grouped_projections=True))
    assert torch.equal(logits, ref_logits)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_grouped_under_bf16_autocast_close() -> None:
    args = ModelArgs.from_size("debug", vocab_size=300, num_layers=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref_loss, ref_grads = run(args)
        _, loss, grads = run(args.replace(grouped_projections=True))
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


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
