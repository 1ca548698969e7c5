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
