"""Tensor parallelism on real process groups (gloo, CPU): TP=2 equals TP=1 under both CoLA schemes
(``split-rank`` and ``bottleneck``), mappings are conjugate, the byte counter matches the analytic
model, and TP=2 × DP=2 builds the right groups.

To keep the suite fast on 2 cores, all TP=2 checks run in one spawned 2-process job (and the TP×DP
checks in one 4-process job); each check writes an ``ok``/``err`` marker per rank, and one pytest test
per check reads them. A failing check stops its job: the checks after it report "not reached".
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cola.checkpoint import merge_tp_shards
from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.layers import CrossEntropyLoss
from megatron_cola.model.recompute import record_kept_tensors
from megatron_cola.parallel import (
    CommCounter,
    ParallelState,
    all_gather_last_dim,
    apply_tensor_parallel,
    copy_to_tp,
    full_shape,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_scatter_to_tp_last_dim,
    reduce_to_sharded_tp,
    tp_split_dims,
    vocab_parallel_cross_entropy,
)
from megatron_cola.parallel.bottleneck import BottleneckCoLA, DeferredRMSNorm
from megatron_cola.parallel.comm import model_comm_bytes
from megatron_cola.parallel.layers import ColumnParallelCoLA, RowParallelCoLA

pytestmark = pytest.mark.slow

VOCAB = 256
SCHEMES = ("split-rank", "bottleneck")


def debug_args(**overrides: object) -> ModelArgs:
    return ModelArgs.from_size("debug", **{"vocab_size": VOCAB, "num_layers": 2, **overrides})


def batch(seed: int = 0, bsz: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (bsz, seq), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.roll(tokens, -1, dims=1)


def gather_along(t: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_grads(model: torch.nn.Module, state: ParallelState) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, sharded ones gathered along their ``tp_split_dim``."""
    dims = tp_split_dims(model)
    return {
        name: gather_along(p.grad, dims[name], state.tp_group) if name in dims else p.grad
        for name, p in model.named_parameters()
    }


def assert_tp_equals_plain(
    args: ModelArgs, state: ParallelState, seed: int = 3, data_seed: int = 0, scheme: str = "split-rank"
) -> None:
    tokens, labels = batch(data_seed)
    mask = (torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) > 0.25).float()
    ref = CoLALlama(args, seed=seed)
    ref_logits = ref(tokens)
    ref_loss = ref(tokens, labels, mask)
    ref_loss.backward()

    model = apply_tensor_parallel(CoLALlama(args, seed=seed), state, scheme)
    logits = model(tokens)
    loss = model(tokens, labels, mask)
    loss.backward()
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    grads = full_grads(model, state)
    assert grads.keys() == dict(ref.named_parameters()).keys()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------- TP=2 checks
def check_state(state: ParallelState) -> None:
    r = dist.get_rank()
    assert (state.tp_size, state.tp_rank, state.dp_size, state.dp_rank) == (2, r, 1, 0)
    assert state.tp_ranks == [0, 1] and state.dp_ranks == [r]
    mpu = state.mpu()
    assert mpu.get_model_parallel_rank() == mpu.get_tensor_model_parallel_rank() == r
    assert mpu.get_model_parallel_world_size() == mpu.get_tensor_model_parallel_world_size() == 2
    assert mpu.get_model_parallel_group() is state.tp_group
    assert mpu.get_data_parallel_group() is state.dp_group
    assert (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()) == (1, 0)
    assert mpu.get_tensor_model_parallel_src_rank() == 0
    t = torch.tensor([float(r + 1)])
    dist.all_reduce(t, group=state.tp_group)
    assert t.item() == 3.0


def check_mappings_conjugate(state: ParallelState) -> None:
    """Each mapping's forward and backward against the logical (gathered) computation, float64.

    A replicated tensor is one logical variable; per-rank tensors are separate variables; the logical
    loss is ``sum over ranks <out_i, g_i>`` where ``g_i`` differ per rank after a sharded output and are
    equal after a replicated one."""
    group, r, t = state.tp_group, state.tp_rank, state.tp_size
    gen = torch.Generator().manual_seed(10 + r)  # per rank
    shared = torch.Generator().manual_seed(99)  # same on all ranks

    def per_rank(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def same(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=shared, dtype=torch.float64)

    def all_of(x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(t)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return parts

    # copy_to_tp: replicated in, per-rank consumers -> dX = sum_i g_i
    x = same(3, 4).requires_grad_()
    g = per_rank(3, 4)
    y = copy_to_tp(x, group)
    torch.testing.assert_close(y, x)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, sum(all_of(g)))

    # reduce_from_tp: per-rank in, replicated consumer -> y = sum_i x_i, dx_i = g
    x = per_rank(3, 4).requires_grad_()
    x_before = x.detach().clone()
    g = same(3, 4)
    y = reduce_from_tp(x, group)
    torch.testing.assert_close(y, sum(all_of(x.detach())))
    torch.testing.assert_close(x.detach(), x_before)  # input untouched
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g)

    # reduce_to_sharded_tp: per-rank in, per-rank consumers -> y = sum_i x_i, dx_i = sum_j g_j
    x = per_rank(3, 1).requires_grad_()
    g = per_rank(3, 1)
    y = reduce_to_sharded_tp(x, group)
    torch.testing.assert_close(y, sum(all_of(x.detach())))
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, sum(all_of(g)))

    # gather_from_tp_last_dim: per-rank slices in, replicated consumer -> dx_i = slice_i(G)
    x = per_rank(2, 3, 5).transpose(0, 1).requires_grad_()  # (3, 2, 5), non-contiguous
    g = same(3, 2, 5 * t)
    y = gather_from_tp_last_dim(x, group)
    torch.testing.assert_close(y, torch.cat(all_of(x.detach()), dim=-1))
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g[..., r * 5 : (r + 1) * 5])

    # all_gather_last_dim: per-rank slices in, per-rank consumers -> dx_i = slice_i(sum_j g_j)
    x = per_rank(3, 2, 5).requires_grad_()
    g = per_rank(3, 2, 5 * t)
    y = all_gather_last_dim(x, group)
    torch.testing.assert_close(y, torch.cat(all_of(x.detach()), dim=-1))
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, sum(all_of(g))[..., r * 5 : (r + 1) * 5])

    # reduce_scatter_to_tp_last_dim: per-rank partials in, per-rank slices out -> dx_i = cat_j(g_j)
    x = per_rank(4, 3, 2 * t).transpose(0, 1).requires_grad_()  # (3, 4, 2t), non-contiguous
    g = per_rank(3, 4, 2)
    y = reduce_scatter_to_tp_last_dim(x, group)
    torch.testing.assert_close(y, sum(all_of(x.detach()))[..., r * 2 : (r + 1) * 2])
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, torch.cat(all_of(g), dim=-1))

    # the counter sees every collective with ring bytes (t=2: all-reduce n, gather / scatter n/2)
    with CommCounter() as counter:
        x = same(8, 6).requires_grad_()
        y = reduce_scatter_to_tp_last_dim(all_gather_last_dim(copy_to_tp(x, group), group), group)
        y.sum().backward()
    kinds = [(rec.kind, rec.direction, rec.numel) for rec in counter.records]
    assert kinds == [
        ("all_gather", "forward", 8 * 6 * t),
        ("reduce_scatter", "forward", 8 * 6 * t),
        ("all_gather", "backward", 8 * 6 * t),
        ("reduce_scatter", "backward", 8 * 6 * t),
        ("all_reduce", "backward", 8 * 6),
    ]
    assert counter.total_bytes == 8 * (4 * 8 * 6 * t / 2 + 8 * 6)


def check_vocab_parallel_cross_entropy(state: ParallelState) -> None:
    group, r, t = state.tp_group, state.tp_rank, state.tp_size
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(3, 7, 64, generator=gen) * 4
    labels = torch.randint(0, 64, (3, 7), generator=gen)
    labels[1, 2] = -100  # ignore index, as in the dense loss
    mask = (torch.rand(3, 7, generator=gen) > 0.3).float()
    for loss_mask in (None, mask):
        for dtype in (torch.float32, torch.bfloat16):
            dense_in = full.to(dtype).clone().requires_grad_()
            ref = CrossEntropyLoss()(dense_in, labels, loss_mask)
            ref.backward()
            local = full.to(dtype).chunk(t, dim=-1)[r].clone().requires_grad_()  # (3, 7, 64/t)
            losses = vocab_parallel_cross_entropy(local, labels, group)
            assert losses.dtype == torch.float32
            loss = losses.mean() if loss_mask is None else (losses * mask).sum() / mask.sum()
            loss.backward()
            torch.testing.assert_close(loss, ref)
            assert local.grad.dtype == dtype
            torch.testing.assert_close(local.grad, dense_in.grad.chunk(t, dim=-1)[r])


def check_cola(state: ParallelState) -> None:
    for scheme in SCHEMES:
        assert_tp_equals_plain(debug_args(), state, scheme=scheme)


def check_cola_without_gate_silu(state: ParallelState) -> None:
    for scheme in SCHEMES:
        assert_tp_equals_plain(debug_args(gate_activation=False, num_layers=1), state, scheme=scheme)


def check_cola_m(state: ParallelState) -> None:
    for scheme in SCHEMES:
        assert_tp_equals_plain(debug_args(recompute="cola-m"), state, scheme=scheme)


def check_cola_full_recompute(state: ParallelState) -> None:
    for scheme in SCHEMES:
        assert_tp_equals_plain(debug_args(recompute="full", num_layers=1), state, scheme=scheme)


def check_full_rank(state: ParallelState) -> None:
    # the flag does not apply to full-rank models: Megatron's dense TP either way
    assert_tp_equals_plain(debug_args(full_rank=True), state, scheme="bottleneck")


def check_full_rank_full_recompute(state: ParallelState) -> None:
    assert_tp_equals_plain(debug_args(full_rank=True, recompute="full"), state)


def check_layers_are_swapped(state: ParallelState) -> None:
    model = apply_tensor_parallel(CoLALlama(debug_args()), state)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.q_proj, ColumnParallelCoLA) and isinstance(mlp.down_proj, RowParallelCoLA)
    d, r, f = 256, 64, 688
    assert attn.q_proj.weight_a.shape == (r // 2, d) and attn.q_proj.weight_b.shape == (d // 2, r)
    assert mlp.down_proj.weight_a.shape == (r, f // 2) and mlp.down_proj.weight_b.shape == (d, r // 2)
    assert model.embed_tokens.weight.shape == (VOCAB // 2, d) == model.lm_head.weight.shape
    assert model.layers[0].input_layernorm.weight.shape == (d,)
    for p in (attn.q_proj.weight_a, mlp.down_proj.weight_b, model.embed_tokens.weight):
        assert p.tensor_model_parallel  # DeepSpeed's flag, written from the plan
    assert not hasattr(model.norm.weight, "tensor_model_parallel")
    assert set(tp_split_dims(model)) == {n for n, _ in model.named_parameters() if "norm" not in n}
    assert model.sharding.dim("layers.0.self_attn.q_proj.weight_a") == 0
    assert model.sharding.dim("layers.0.mlp.down_proj.weight_b") == 1
    assert model.sharding.dim("norm.weight") is None
    assert full_shape(model, "layers.0.mlp.down_proj.weight_a") == (r, f)
    assert model.sharding.scheme == "split-rank"
    assert model.sharding.tp_size == 2 and not vars(attn.q_proj.weight_a).keys() - {
        "tensor_model_parallel",
        "partition_dim",
        "partition_stride",
    }
    h = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mlp(x=h), mlp(h))  # the region-entry hook handles keyword calls too
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert attn.q_proj.weight_a.tensor_model_parallel  # re-marked on the new Parameter objects
    with pytest.raises(ValueError, match="already tensor-parallel"):
        apply_tensor_parallel(model, state)
    with pytest.raises(ValueError, match="vocab_size 255 is not divisible by tensor-model-parallel size 2"):
        apply_tensor_parallel(CoLALlama(debug_args(vocab_size=255, num_layers=1)), state)

    # bottleneck: every parameter split, the residual stream's d in A's columns and B's rows
    model = apply_tensor_parallel(CoLALlama(debug_args()), state, "bottleneck")
    block = model.layers[0]
    attn, mlp = block.self_attn, block.mlp
    assert model.sharding.scheme == "bottleneck"
    assert isinstance(attn.q_proj, BottleneckCoLA) and isinstance(block.input_layernorm, DeferredRMSNorm)
    assert attn.q_proj.weight_a.shape == (r, d // 2) and attn.q_proj.weight_b.shape == (d // 2, r)
    assert mlp.down_proj.weight_a.shape == (r, f // 2) and mlp.down_proj.weight_b.shape == (d // 2, r)
    assert model.embed_tokens.weight.shape == (VOCAB, d // 2)
    assert model.lm_head.weight.shape == (VOCAB // 2, d)
    assert set(tp_split_dims(model)) == {n for n, _ in model.named_parameters()}
    dims = {"embed_tokens.weight": 1, "norm.weight": 0, "lm_head.weight": 0}
    dims |= {"layers.0.input_layernorm.weight": 0, "layers.0.mlp.gate_proj.weight_a": 1}
    dims |= {"layers.0.mlp.gate_proj.weight_b": 0, "layers.0.self_attn.o_proj.weight_a": 1}
    assert {n: model.sharding.dim(n) for n in dims} == dims
    assert model.norm.weight.tensor_model_parallel and full_shape(model, "norm.weight") == (d,)
    with pytest.raises(Exception, match="cola_rank"):
        apply_tensor_parallel(CoLALlama(debug_args(cola_rank=63, num_layers=1)), state, "split-rank")
    apply_tensor_parallel(CoLALlama(debug_args(cola_rank=63, num_layers=1)), state, "bottleneck")  # any r


def check_init_and_checkpoint_shards(state: ParallelState) -> None:
    """Shards are cut from the seeded full weights (plain model, init_weights, meta build) and the
    model-file merge of the ranks' shards along ``tp_split_dims`` gives the plain state dict back."""
    for args, scheme in (
        (debug_args(), "split-rank"),
        (debug_args(), "bottleneck"),
        (debug_args(full_rank=True), ""),
    ):
        scheme = scheme or "split-rank"
        plain = CoLALlama(args, seed=7)
        model = apply_tensor_parallel(CoLALlama(args, seed=7), state, scheme)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.init_weights(7)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        with torch.device("meta"):
            meta = CoLALlama(args)
        meta = apply_tensor_parallel(meta, state, scheme)
        meta.to_empty(device="cpu")  # may replace the Parameter objects: the plan is on the model
        assert tp_split_dims(meta) == tp_split_dims(model)
        meta.init_weights(7)
        for k, v in meta.state_dict().items():
            assert torch.equal(v, before[k]), k
        files: list[dict] = [None] * state.tp_size  # type: ignore[list-item]
        dist.all_gather_object(
            files,
            {"split_dims": tp_split_dims(model), "state_dict": model.state_dict()},
            group=state.tp_group,
        )
        merged = merge_tp_shards(files)
        ref = plain.state_dict()
        assert merged.keys() == ref.keys()
        for k in ref:
            assert torch.equal(merged[k], ref[k]), k


def check_comm_counter_matches_analytic(state: ParallelState) -> None:
    tokens, labels = batch(0)
    for args in (
        debug_args(),
        debug_args(recompute="full"),
        debug_args(recompute="cola-m"),
        debug_args(full_rank=True),
        debug_args(full_rank=True, recompute="full"),
    ):
        model = apply_tensor_parallel(CoLALlama(args, seed=1), state)
        with CommCounter() as counter:
            model(tokens, labels).backward()
        expected = model_comm_bytes(args, state.tp_size, tokens.numel(), dtype_bytes=4)
        assert counter.total_bytes == pytest.approx(expected, rel=1e-12), (args.recompute, args.full_rank)
    for args in (debug_args(), debug_args(grouped_projections=True), debug_args(recompute="cola-m")):
        model = apply_tensor_parallel(CoLALlama(args, seed=1), state, "bottleneck")
        with CommCounter() as counter:
            model(tokens, labels).backward()
        assert counter.total_bytes == pytest.approx(
            bottleneck_bytes(args, state.tp_size, tokens.numel()), rel=1e-12
        ), (args.recompute, args.grouped_projections)
        calls = len(counter.records) - 6  # the final norm (2), the head (2) and the loss (2)
        assert calls == args.num_layers * (8 if args.grouped_projections else 14)


def bottleneck_bytes(args: ModelArgs, t: int, tokens: int, elem: int = 4) -> float:
    """What the bottleneck scheme moves in one fp32 forward + backward (docs/tensor_parallel.md): per
    block, all-reduces of 7r + 5 (plain: q/k/v/gate/up each carry their norm's sum of squares) or
    7r + 2 (grouped) elements forward and 7r backward; the final norm's sum of squares (fwd + bwd),
    the head's all-gather of d (fwd) and reduce-scatter (bwd), the loss's 3 fp32 numbers."""
    d, r, ar, ag = args.hidden_size, args.cola_rank, 2 * (t - 1) / t, (t - 1) / t
    extra = 2 if args.grouped_projections else 5
    block = ar * (14 * r + extra)
    outside = ar * 2 + ag * 2 * d + ar * 3
    return elem * tokens * (args.num_layers * block + outside)


def check_cola_m_keeps_rank_slices(state: ParallelState) -> None:
    """Per rank, CoLA-M keeps the r/t slice of each of the seven A outputs (o/down: after the
    reduce-scatter)."""
    args = debug_args(recompute="cola-m")
    model = apply_tensor_parallel(CoLALlama(args), state)
    tokens, labels = batch(0)
    with record_kept_tensors() as kept:
        model(tokens, labels).backward()
    r, t = args.cola_rank, state.tp_size
    per_token_layer = sum(k.numel() for k in kept) / tokens.numel() / args.num_layers
    assert per_token_layer == 7 * r / t
    # bottleneck: the all-reduced A outputs, whole (r each, + the sum of squares carried by q/k/v/gate/up)
    model = apply_tensor_parallel(CoLALlama(args), state, "bottleneck")
    with record_kept_tensors() as kept, CommCounter() as counter:
        model(tokens, labels).backward()
    assert sum(k.numel() for k in kept) / tokens.numel() / args.num_layers == 7 * r + 5
    # ... so recomputation re-runs no collective: 14 per block, as without recomputation
    assert len(counter.records) - 6 == 14 * args.num_layers


def check_bf16_autocast_runs(state: ParallelState) -> None:
    args = debug_args(recompute="cola-m")
    tokens, labels = batch(0)
    for scheme in SCHEMES:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = CoLALlama(args, seed=3)(tokens, labels)
            model = apply_tensor_parallel(CoLALlama(args, seed=3), state, scheme)
            loss = model(tokens, labels)
        loss.backward()
        torch.testing.assert_close(loss, ref, atol=0.05, rtol=0.02)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def check_deepspeed_grad_norm(state: ParallelState) -> None:
    """DeepSpeed's clipping with our mpu sees the whole model's gradient norm, replicated params once."""
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_

    deepspeed.init_distributed(dist_backend="gloo")
    args = debug_args()
    tokens, labels = batch(0)
    ref = CoLALlama(args, seed=3)
    ref(tokens, labels).backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
    for scheme in SCHEMES:  # bottleneck: the norms' scales are split too
        model = apply_tensor_parallel(CoLALlama(args, seed=3), state, scheme)
        model(tokens, labels).backward()
        norm = clip_grad_norm_(list(model.parameters()), max_norm=1e9, mpu=state.mpu())
        torch.testing.assert_close(norm.reshape(()), ref_norm)


def check_grouped_projections_agree(state: ParallelState) -> None:
    """Per rank, grouping the local q/k/v (gate/up) slices into one GEMM agrees with the plain path to
    1e-5 relative in fp32 (every entry within 1e-5 of its tensor's largest; tests/test_grouped.py)."""

    def close(actual: torch.Tensor, expected: torch.Tensor, what: object) -> None:
        atol = 1e-5 * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=str(what))

    tokens, labels = batch(0)
    cases = [(debug_args(), "split-rank"), (debug_args(recompute="cola-m"), "split-rank")]
    cases += [(debug_args(full_rank=True), "split-rank"), (debug_args(recompute="cola-m"), "bottleneck")]
    for args, scheme in cases:
        results = []
        for grouped in (False, True):
            plain = CoLALlama(args.replace(grouped_projections=grouped), seed=3)
            model = apply_tensor_parallel(plain, state, scheme)
            logits = model(tokens)
            loss = model(tokens, labels)
            loss.backward()
            results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
        (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results
        close(logits, ref_logits, ("logits", args.recompute, args.full_rank))
        close(loss, ref_loss, ("loss", args.recompute, args.full_rank))
        for name in ref_grads:
            close(grads[name], ref_grads[name], (name, args.recompute, args.full_rank))


def check_compiled_blocks(state: ParallelState) -> None:
    """Compiled TP blocks (collectives are graph breaks) compute what eager TP blocks do."""
    from megatron_cola.model.compile import compile_blocks

    tokens, labels = batch(0)
    for args, scheme in (
        (debug_args(num_layers=1), "split-rank"),
        (debug_args(num_layers=1, recompute="cola-m", grouped_projections=True), "split-rank"),
        (debug_args(num_layers=1, recompute="cola-m", grouped_projections=True), "bottleneck"),
    ):
        eager = apply_tensor_parallel(CoLALlama(args, seed=3), state, scheme)
        compiled = compile_blocks(apply_tensor_parallel(CoLALlama(args, seed=3), state, scheme))
        for model in (eager, compiled):
            model(tokens, labels).backward()
        torch.testing.assert_close(compiled(tokens, labels), eager(tokens, labels), rtol=1e-5, atol=0)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


TP2_CHECKS: dict[str, Callable[[ParallelState], None]] = {
    f.__name__.removeprefix("check_"): f
    for f in (
        check_state,
        check_mappings_conjugate,
        check_vocab_parallel_cross_entropy,
        check_layers_are_swapped,
        check_cola,
        check_cola_without_gate_silu,
        check_cola_m,
        check_cola_full_recompute,
        check_full_rank,
        check_full_rank_full_recompute,
        check_init_and_checkpoint_shards,
        check_comm_counter_matches_analytic,
        check_cola_m_keeps_rank_slices,
        check_bf16_autocast_runs,
        check_deepspeed_grad_norm,
        check_grouped_projections_agree,
        check_compiled_blocks,
    )
}


# ---------------------------------------------------------------------- TP=2 x DP=2 checks
def check_tp2_dp2_groups(state: ParallelState) -> None:
    g = dist.get_rank()
    assert state.tp_ranks == [g // 2 * 2, g // 2 * 2 + 1] and state.dp_ranks == [g % 2, g % 2 + 2]
    assert (state.tp_rank, state.dp_rank, state.dp_size) == (g % 2, g // 2, 2)
    mpu = state.mpu()
    assert mpu.get_data_parallel_group_ranks() == state.dp_ranks
    assert mpu.get_tensor_model_parallel_src_rank() == state.tp_ranks[0]
    t = torch.tensor([float(g)])
    dist.all_reduce(t, group=state.tp_group)
    assert t.item() == sum(state.tp_ranks)
    t = torch.tensor([float(g)])
    dist.all_reduce(t, group=state.dp_group)
    assert t.item() == sum(state.dp_ranks)


def check_tp2_dp2_model(state: ParallelState) -> None:
    """Each DP replica (its own data) computes with its own TP pair what the plain model does."""
    for scheme in SCHEMES:
        assert_tp_equals_plain(debug_args(num_layers=1), state, data_seed=state.dp_rank, scheme=scheme)


TP2_DP2_CHECKS: dict[str, Callable[[ParallelState], None]] = {
    "tp2_dp2_groups": check_tp2_dp2_groups,
    "tp2_dp2_model": check_tp2_dp2_model,
}
ALL_CHECKS = {**TP2_CHECKS, **TP2_DP2_CHECKS}


# ---------------------------------------------------------------------- harness
def _worker(rank: int, world: int, tp: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        state = ParallelState.from_torch_distributed(tp)
    except BaseException:
        Path(out_dir, f"setup.rank{rank}.err").write_text(traceback.format_exc())
        raise
    for name in names:
        try:
            ALL_CHECKS[name](state)
        except BaseException:
            Path(out_dir, f"{name}.rank{rank}.err").write_text(traceback.format_exc())
            raise
        Path(out_dir, f"{name}.rank{rank}.ok").touch()
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(out_dir: Path, world: int, tp: int, names: list[str]) -> str:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(world, tp, _free_port(), str(out_dir), names), nprocs=world, join=True)
    except Exception as e:  # reported per check below
        return f"{type(e).__name__}: {e}"
    return ""


def _assert_passed(out_dir: Path, job_error: str, name: str, world: int) -> None:
    for rank in range(world):
        if Path(out_dir, f"{name}.rank{rank}.ok").exists():
            continue
        err = Path(out_dir, f"{name}.rank{rank}.err")
        if err.exists():
            pytest.fail(f"check {name} failed on rank {rank}:\n{err.read_text()}")
        pytest.fail(f"check {name} not reached on rank {rank} (an earlier check failed): {job_error}")


@pytest.fixture(scope="module")
def tp2_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tp2")
    return out, _run_job(out, 2, 2, list(TP2_CHECKS))


@pytest.fixture(scope="module")
def tp2_dp2_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tp2dp2")
    return out, _run_job(out, 4, 2, list(TP2_DP2_CHECKS))


@pytest.mark.parametrize("name", list(TP2_CHECKS))
def test_tp2(name: str, tp2_job: tuple[Path, str]) -> None:
    _assert_passed(*tp2_job, name, world=2)


@pytest.mark.parametrize("name", list(TP2_DP2_CHECKS))
def test_tp2_dp2_oversubscribed(name: str, tp2_dp2_job: tuple[Path, str]) -> None:
    _assert_passed(*tp2_dp2_job, name, world=4)


def test_world_size_not_divisible_in_a_real_group(tmp_path: Path) -> None:
    """``from_torch_distributed`` refuses an impossible layout with the message (3 ranks, TP=2)."""
    error = _run_job(tmp_path, 3, 2, [])
    assert error, "a 3-process job with TP=2 should fail"
    messages = [p.read_text() for p in tmp_path.glob("*.err")]
    assert messages and all(
        "world size 3 is not divisible by --tensor-model-parallel-size 2" in m for m in messages
    )
