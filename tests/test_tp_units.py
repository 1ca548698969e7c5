"""Tensor parallelism, single process: layout, size checks and their messages, the analytic comm model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cola.config import ModelArgs
from megatron_cola.errors import ConfigError
from megatron_cola.model import CoLALlama
from megatron_cola.model.layers import CrossEntropyLoss
from megatron_cola.parallel import (
    CommCounter,
    ParallelState,
    apply_tensor_parallel,
    block_comm_bytes_per_token,
    check_tensor_parallel_size,
    comm_table,
    pad_vocab_size,
    tp_split_dims,
    vocab_parallel_cross_entropy,
)
from megatron_cola.parallel.comm import block_comm_volume, model_comm_bytes
from megatron_cola.parallel.counter import ring_factor
from megatron_cola.parallel.state import data_parallel_ranks, tensor_parallel_ranks

ROOT = Path(__file__).resolve().parent.parent


def test_layout_is_megatrons() -> None:
    assert tensor_parallel_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert data_parallel_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert tensor_parallel_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data_parallel_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert data_parallel_ranks(4, 4) == [[0], [1], [2], [3]]


def test_world_size_not_divisible_message() -> None:
    with pytest.raises(
        ConfigError, match=r"world size 3 is not divisible by --tensor-model-parallel-size 2; "
    ):
        check_tensor_parallel_size(2, 3)
    with pytest.raises(ConfigError, match="positive integer"):
        check_tensor_parallel_size(0, 4)


def test_single_state_and_mpu() -> None:
    state = ParallelState.single()
    assert (state.tp_size, state.tp_rank, state.dp_size, state.dp_rank) == (1, 0, 1, 0)
    assert state.tp_group is None and state.dp_group is None
    mpu = state.mpu()
    assert mpu.get_model_parallel_world_size() == mpu.get_tensor_model_parallel_world_size() == 1
    assert mpu.get_data_parallel_world_size() == 1 and mpu.get_data_parallel_group_ranks() == [0]
    assert not hasattr(mpu, "initialize_sequence_parallel")  # would make DeepSpeed ignore the DP group


def test_multi_process_state_without_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="from_torch_distributed"):
        ParallelState(world_size=2, rank=0, tp_size=2)
    with pytest.raises(RuntimeError, match="initialised"):
        ParallelState.from_torch_distributed(2)


def test_ffn_not_divisible_names_the_flag() -> None:
    args = ModelArgs.from_size("1B")
    msg = (
        "ffn_hidden_size 5461 is not divisible by tensor-model-parallel size 2; "
        "pass --ffn-hidden-size 5462 (or another multiple of 2)"
    )
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        check_tensor_parallel_size(2, model_args=args)
    with pytest.raises(ConfigError, match="--ffn-hidden-size 5464"):
        check_tensor_parallel_size(8, model_args=args)
    check_tensor_parallel_size(8, model_args=args.replace(ffn_hidden_size=5464))  # the suggested fix works


def test_heads_rank_vocab_not_divisible_messages() -> None:
    args = ModelArgs.from_size("debug", vocab_size=256)  # 4 heads, rank 64
    with pytest.raises(
        ConfigError, match=r"num_attention_heads 4 is not divisible by tensor-model-parallel size 3"
    ):
        check_tensor_parallel_size(3, model_args=args.replace(ffn_hidden_size=690))
    with pytest.raises(ConfigError, match=r"cola_rank 66 is not divisible .* size 4; pass --cola-rank 68"):
        check_tensor_parallel_size(4, model_args=args.replace(cola_rank=66))
    with pytest.raises(
        ConfigError, match=r"vocab_size 257 is not divisible .*--make-vocab-size-divisible-by"
    ):
        check_tensor_parallel_size(2, model_args=args.replace(vocab_size=257))
    check_tensor_parallel_size(
        4, model_args=args.replace(full_rank=True, cola_rank=66)
    )  # rank unused in full rank


def test_pad_vocab_size() -> None:
    assert pad_vocab_size(50257, 128, 1) == 50304
    assert pad_vocab_size(50257, 128, 2) == 50432
    assert pad_vocab_size(32000, 128, 8) == 32768
    assert pad_vocab_size(32000, 1, 8) == 32000
    assert pad_vocab_size(257, 1, 2) == 258
    with pytest.raises(ValueError):
        pad_vocab_size(0, 128, 2)


def test_tp1_transform_is_identity() -> None:
    args = ModelArgs.from_size("debug", vocab_size=256, num_layers=1)
    model = CoLALlama(args, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_tensor_parallel(model, ParallelState.single()) is model
    assert tp_split_dims(model) == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_vocab_parallel_cross_entropy_without_group_equals_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=gen, requires_grad=True)
    labels = torch.randint(0, 40, (3, 5), generator=gen)
    labels[0, 1] = -100
    mask = (torch.rand(3, 5, generator=gen) > 0.3).float()
    ref = CrossEntropyLoss()(logits, labels, mask)
    (g_ref,) = torch.autograd.grad(ref, logits)
    losses = vocab_parallel_cross_entropy(logits, labels, None)
    out = (losses * mask).sum() / mask.sum()
    (g,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)


def test_ring_factors_and_counter_idle() -> None:
    assert ring_factor("all_reduce", 4) == 1.5
    assert ring_factor("all_gather", 4) == ring_factor("reduce_scatter", 4) == 0.75
    with CommCounter() as counter:
        torch.ones(3).sum()
    assert counter.total_bytes == 0 and counter.records == []


def test_analytic_cola_vs_dense() -> None:
    for size in ("1B", "7B"):
        args = ModelArgs.from_size(size)
        d, r = args.hidden_size, args.cola_rank
        for t in (2, 4, 8):
            dense = block_comm_bytes_per_token(args, t, "dense")
            cola = block_comm_bytes_per_token(args, t, "cola")
            assert dense == pytest.approx(2 * 8 * d * (t - 1) / t)  # bf16, 4 all-reduces of d
            assert cola / dense == pytest.approx(1 + 1.75 * r / d)
            assert cola / dense <= 1.5
            assert block_comm_bytes_per_token(args, t, "naive") > 3 * dense
    rows = comm_table(schemes=("split-rank",))
    assert len(rows) == 6 and all(row["ratio"] <= 1.5 for row in rows)


def test_analytic_recompute_and_model_total() -> None:
    args = ModelArgs.from_size("debug", vocab_size=256, num_layers=2)
    fwd, bwd = block_comm_volume(args, "cola", "none")
    _, bwd_full = block_comm_volume(args, "cola", "full")
    _, bwd_m = block_comm_volume(args, "cola", "cola-m")
    d = args.hidden_size
    assert bwd_full.all_gather - bwd.all_gather == fwd.all_gather
    assert bwd_full.all_reduce - bwd.all_reduce == fwd.all_reduce - d
    assert bwd_m.all_reduce == bwd.all_reduce and bwd_m.reduce_scatter == bwd.reduce_scatter
    assert bwd_m.all_gather - bwd.all_gather == fwd.all_gather
    per_block = block_comm_bytes_per_token(args, 2, dtype_bytes=4)
    total = model_comm_bytes(args, 2, tokens=10, dtype_bytes=4)
    assert total == pytest.approx(10 * (2 * per_block + 4 * 2 * d + 4 * 3))  # fp32, t=2: AR factor 1


def test_comm_bytes_tool_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "comm_bytes.py"), "--model-size", "7B", "--tp", "2", "8"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "| 7B | 2 |" in out and "| 7B | 8 |" in out and "1.438" in out


# ---------------------------------------------------------------------- schemes, plan, head, ops
def test_effective_scheme_and_size_checks_per_scheme() -> None:
    from megatron_cola.config import DEFAULT_TP_SCHEME, TP_SCHEMES
    from megatron_cola.parallel import effective_scheme

    cola = ModelArgs.from_size("debug", vocab_size=256, num_layers=1)
    assert DEFAULT_TP_SCHEME in TP_SCHEMES == ("split-rank", "bottleneck")
    assert [effective_scheme(cola, s) for s in TP_SCHEMES] == list(TP_SCHEMES)
    assert effective_scheme(cola.replace(full_rank=True), "bottleneck") == "dense"
    with pytest.raises(ValueError, match="unknown tensor-parallel scheme"):
        effective_scheme(cola, "naive")
    odd_rank = cola.replace(cola_rank=63)
    with pytest.raises(ConfigError, match="--cola-rank 64"):
        check_tensor_parallel_size(2, model_args=odd_rank, scheme="split-rank")
    check_tensor_parallel_size(2, model_args=odd_rank, scheme="bottleneck")  # r is never split


def test_sharding_plan_records_its_scheme() -> None:
    from megatron_cola.model.sharding import ShardingPlan, ShardSpec

    plan = ShardingPlan(tp_size=2, tp_rank=1, scheme="bottleneck")
    plan.add("embed_tokens.weight", ShardSpec((256, 8), 1, 2, 1))
    full = torch.arange(256 * 8.0).view(256, 8)
    assert torch.equal(plan.shard("embed_tokens.weight", full), full[:, 4:])
    assert plan.split_dims() == {"embed_tokens.weight": 1} and plan.dim("norm.weight") is None
    assert ShardingPlan().scheme == "none"
    with pytest.raises(ValueError, match="sharding scheme 'naive'"):
        ShardingPlan(scheme="naive")


def test_lm_head_owns_the_loss() -> None:
    """``LMHead.loss`` is the reference cross entropy of ``head(hidden)``, chunked or not; the model has
    no loss slot of its own."""
    from megatron_cola.model.layers import LMHead

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 16, generator=gen)
    labels = torch.randint(0, 40, (2, 5), generator=gen)
    mask = (torch.rand(2, 5, generator=gen) > 0.3).float()
    head = LMHead(16, 40)
    chunked = LMHead(16, 40, chunked=True)
    chunked.load_state_dict(head.state_dict())
    ref = CrossEntropyLoss()(head(hidden), labels, mask)
    torch.testing.assert_close(head.loss(hidden, labels, mask), ref)
    torch.testing.assert_close(chunked.loss(hidden, labels, mask), ref)
    model = CoLALlama(ModelArgs.from_size("debug", vocab_size=64, num_layers=1), seed=0)
    assert isinstance(model.lm_head, LMHead) and not hasattr(model, "loss_fn")


def test_parallelize_applies_recompute_and_compile_in_one_pass() -> None:
    from megatron_cola.parallel import apply_recompute, parallelize

    model = CoLALlama(ModelArgs.from_size("debug", vocab_size=64, num_layers=1, recompute="cola-m"), seed=0)
    assert parallelize(model, ParallelState.single(), scheme="bottleneck") is model
    assert model.layers[0].recompute == "cola-m" and model.layers[0].self_attn.q_proj.keep_a_output
    apply_recompute(model, "none")
    assert model.layers[0].recompute == "none" and not model.layers[0].mlp.down_proj.keep_a_output
    assert model.sharding.scheme == "none"


def test_cola_tp_scheme_flag() -> None:
    from megatron_cola.config import DEFAULT_TP_SCHEME
    from megatron_cola.training.arguments import parse_args

    assert parse_args(["--data-path", "x"]).cola_tp_scheme == DEFAULT_TP_SCHEME
    assert parse_args(["--data-path", "x", "--cola-tp-scheme", "bottleneck"]).cola_tp_scheme == "bottleneck"
    with pytest.raises(SystemExit):
        parse_args(["--data-path", "x", "--cola-tp-scheme", "naive"])


_BOTTLENECK_OPS = r"""
import os, torch, torch.distributed as dist
from megatron_cola.model.cola_linear import CoLALinear, project_shared_input
from megatron_cola.model.layers import RMSNorm
from megatron_cola.parallel import BottleneckCoLA, CommCounter, DeferredRMSNorm, ParallelState, ShardedRMSNorm

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
state = ParallelState.from_torch_distributed(1)  # a real group of one: the ops run, the sums are trivial
torch.manual_seed(0)
dt = torch.float64
x = torch.randn(2, 3, 16, dtype=dt)
w = torch.randn(4, 16, dtype=dt)
extra = torch.randn(2, 3, 1, dtype=dt)
op = torch.ops.megatron_cola.kept_linear_all_reduce
torch.library.opcheck(op, (x, w, extra, state.tp_group.group_name))
inputs = [t.clone().requires_grad_() for t in (x, w, extra)]
torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, state.tp_group.group_name), inputs)
torch.testing.assert_close(op(x, w, extra, state.tp_group.group_name), torch.cat([x @ w.T, extra], -1))

# a deferred norm finished after A is the plain norm followed by the plain map (values and gradients)
norm = RMSNorm(16, 1e-5).to(dt)
with torch.no_grad():
    norm.weight.normal_()
layers = [CoLALinear(16, 12, 4).to(dt) for _ in range(3)]
twins = [BottleneckCoLA.from_dense(layer, state, norm_eps=1e-5) for layer in layers]
deferred = DeferredRMSNorm.from_dense(norm, state)
h = x.clone().requires_grad_()
ref = [layer(norm(h)) for layer in layers]
sum(r.square().sum() for r in ref).backward()
ref_grads = [h.grad, norm.weight.grad] + [p.grad for layer in layers for p in layer.parameters()]
for grouped in (False, True):
    h.grad = None
    for m in [deferred, *twins]:
        m.zero_grad()
    packet = deferred(h)
    with CommCounter() as counter:
        out = project_shared_input(twins, packet) if grouped else [twin(packet) for twin in twins]
    assert len(counter.records) == (1 if grouped else 3), counter.records  # one all-reduce per group
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)
    sum(o.square().sum() for o in out).backward()
    grads = [h.grad, deferred.weight.grad] + [p.grad for twin in twins for p in twin.parameters()]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
final = ShardedRMSNorm.from_dense(norm, state)
torch.testing.assert_close(final(x), norm(x))
dist.destroy_process_group()
print("OK")
"""


def test_bottleneck_ops_in_a_group_of_one(tmp_path: Path) -> None:
    """The kept all-reduce op passes ``torch.library.opcheck`` and ``gradcheck``; a deferred RMSNorm
    finished inside the A all-reduce equals the plain norm and map, plain and grouped (float64)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PORT": str(port)}
    proc = subprocess.run(
        [sys.executable, "-c", _BOTTLENECK_OPS],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
