"""Tensor parallelism for CoLA and full-rank LLaMA: process groups, mappings, sharded layers, transform.

Typical use (after ``torch.distributed`` / ``deepspeed.init_distributed()``)::

    state = ParallelState.from_torch_distributed(tp_size=args.tensor_model_parallel_size)
    model = apply_tensor_parallel(CoLALlama(model_args, seed=seed), state)
    engine, *_ = deepspeed.initialize(model=model, ..., mpu=state.mpu())

See docs/tensor_parallel.md for the scheme and its communication cost.
"""

from megatron_cola.model.sharding import ShardingPlan, ShardSpec, full_shape, load_full_, shard_dim
from megatron_cola.parallel.comm import block_comm_bytes_per_token, comm_table, model_comm_bytes
from megatron_cola.parallel.counter import CommCounter, CommRecord
from megatron_cola.parallel.cross_entropy import (
    GatherLogits,
    VocabParallelCrossEntropy,
    vocab_parallel_cross_entropy,
)
from megatron_cola.parallel.layers import (
    ColumnParallelCoLA,
    ColumnParallelLinear,
    RowParallelCoLA,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_cola.parallel.mappings import (
    all_gather_last_dim,
    copy_to_tp,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_scatter_to_tp_last_dim,
    scatter_to_tp_last_dim,
)
from megatron_cola.parallel.sizes import (
    check_tensor_parallel_size,
    pad_vocab_size,
)
from megatron_cola.parallel.state import DeepSpeedMPU, ParallelState, set_default_group_timeout
from megatron_cola.parallel.transform import apply_tensor_parallel, tp_split_dims

__all__ = [
    "ColumnParallelCoLA",
    "ColumnParallelLinear",
    "CommCounter",
    "CommRecord",
    "DeepSpeedMPU",
    "GatherLogits",
    "ParallelState",
    "RowParallelCoLA",
    "RowParallelLinear",
    "ShardSpec",
    "ShardingPlan",
    "VocabParallelCrossEntropy",
    "VocabParallelEmbedding",
    "all_gather_last_dim",
    "apply_tensor_parallel",
    "block_comm_bytes_per_token",
    "check_tensor_parallel_size",
    "comm_table",
    "copy_to_tp",
    "full_shape",
    "gather_from_tp_last_dim",
    "load_full_",
    "model_comm_bytes",
    "pad_vocab_size",
    "reduce_from_tp",
    "reduce_scatter_to_tp_last_dim",
    "scatter_to_tp_last_dim",
    "set_default_group_timeout",
    "shard_dim",
    "tp_split_dims",
    "vocab_parallel_cross_entropy",
]
