"""``compile_blocks``: compiled training follows eager, compiled CoLA-M keeps what eager CoLA-M keeps
and runs no A GEMM in backward, and every block is one graph with no break (docs/performance.md).
Tiny models: compiling is slow on two cores."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.activation_memory import measure_saved_activations
from megatron_cola.model.compile import compile_blocks, graph_breaks
from megatron_cola.model.layers import rope_cos_sin
from megatron_cola.model.recompute import A_GEMM_RANGE

pytestmark = pytest.mark.slow


def tiny(**kw: object) -> ModelArgs:
    return ModelArgs.from_size("debug", vocab_size=300, num_layers=1, **kw)


def train_losses(args: ModelArgs, compiled: bool, steps: int = 20) -> list[float]:
    model = CoLALlama(args, seed=5)
    if compiled:
        compile_blocks(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):  # one batch, memorised: the loss must fall
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "overrides",
    [
        {"recompute": "none"},
        {"recompute": "full"},
        {"recompute": "cola-m", "grouped_projections": True},
        {"full_rank": True, "grouped_projections": True},
    ],
    ids=["none", "full", "cola-m-grouped", "full-rank-grouped"],
)
def test_compiled_training_follows_eager(overrides: dict) -> None:
    args = tiny(**overrides)
    eager, compiled = train_losses(args, False), train_losses(args, True)
    assert eager[-1] < eager[0] - 0.5  # it trains
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)


@pytest.mark.parametrize("grouped", [False, True])
def test_compiled_cola_m_keeps_a_outputs(grouped: bool) -> None:
    """Compiled CoLA-M keeps 2d + 7r per token (the two residuals and the A outputs: 7 tensors, 4 when
    grouped), as eager does, and runs no A GEMM in backward (the kept-GEMM profiler range fires once per
    A group in forward, never in backward)."""
    args = tiny(recompute="cola-m", grouped_projections=grouped)
    d, r = args.hidden_size, args.cola_rank
    groups = 4 if grouped else 7
    kept = measure_saved_activations(args, "cola-m", seq_length=16, dtype=torch.float32, compiled=True)
    assert (kept.elements_per_token, kept.num_tensors) == (2 * d + 7 * r, 2 + groups)

    model = compile_blocks(CoLALlama(args, seed=1))
    tokens = torch.randint(0, 300, (1, 16))  # the block's shapes as measured: no recompilation
    model(tokens, tokens).backward()
    with profile(activities=[ProfilerActivity.CPU]) as fwd:
        loss = model(tokens, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as bwd:
        loss.backward()
    assert sum(e.name == A_GEMM_RANGE for e in fwd.events()) == groups
    assert sum(e.name == A_GEMM_RANGE for e in bwd.events()) == 0


@pytest.mark.parametrize("grouped", [False, True])
def test_one_graph_per_block(grouped: bool) -> None:
    """Every recompute mode compiles a block into one graph with no break (CoLA-M too: its policy
    travels into the graph, no eager bookkeeping)."""
    for mode in ("none", "full", "cola-m"):
        args = tiny(recompute=mode, grouped_projections=grouped)
        layer = CoLALlama(args, seed=1).layers[0]
        x = torch.randn(2, 8, args.hidden_size)
        cos, sin = rope_cos_sin(8, args.head_dim, args.rope_theta, x.device)
        counts = graph_breaks(layer, x, cos, sin)
        torch._dynamo.reset()
        assert (counts.graphs, counts.breaks) == (1, 0), (mode, counts.reasons)
