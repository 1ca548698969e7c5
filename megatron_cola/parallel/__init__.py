"""Tensor parallelism for CoLA and full-rank LLaMA: process groups, mappings, sharded layers, transform.

Typical use (after ``torch.distributed`` / ``deepspeed.init_distributed()``)::

    state = ParallelState.from_torch_distributed(tp_size=args.tensor_model_parallel_size)
    model = parallelize(CoLALlama(model_args, seed=seed), state, scheme=args.cola_tp_scheme)
    engine, *_ = deepspeed.initialize(model=model, ..., mpu=state.mpu())

See docs/tensor_parallel.md for the scheme and its communication cost.
"""

from megatron_cola.model.sharding import ShardingPlan, ShardSpec, full_shape, load_full_
from megatron_cola.parallel.bottleneck import (
    BottleneckCoLA,
    DeferredRMSNorm,
    HiddenShardedEmbedding,
    ShardedRMSNorm,
)
from megatron_cola.parallel.comm import block_comm_bytes_per_token, comm_table, model_comm_bytes
from megatron_cola.parallel.counter import CommCounter, CommRecord
from megatron_cola.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_cola.parallel.layers import (
    ColumnParallelCoLA,
    ColumnParallelLinear,
    RowParallelCoLA,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)
from megatron_cola.parallel.mappings import (
    all_gather_last_dim,
    copy_to_tp,
    gather_from_tp_last_dim,
    reduce_from_tp,
    reduce_scatter_to_tp_last_dim,
    reduce_to_sharded_tp,
)
from megatron_cola.parallel.parallelize import apply_recompute, parallelize
from megatron_cola.parallel.sizes import (
    check_tensor_parallel_size,
    pad_vocab_size,
)
from megatron_cola.parallel.state import DeepSpeedMPU, ParallelState, set_default_group_timeout
from megatron_cola.parallel.transform import apply_tensor_parallel, effective_scheme, tp_split_dims

__all__ = [
    "BottleneckCoLA",
    "ColumnParallelCoLA",
    "ColumnParallelLinear",
    "CommCounter",
    "CommRecord",
    "DeepSpeedMPU",
    "DeferredRMSNorm",
    "HiddenShardedEmbedding",
    "ParallelState",
    "RowParallelCoLA",
    "RowParallelLinear",
    "ShardSpec",
    "ShardedRMSNorm",
    "ShardingPlan",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "all_gather_last_dim",
    "apply_recompute",
    "apply_tensor_parallel",
    "block_comm_bytes_per_token",
    "check_tensor_parallel_size",
    "comm_table",
    "copy_to_tp",
    "effective_scheme",
    "full_shape",
    "gather_from_tp_last_dim",
    "load_full_",
    "model_comm_bytes",
    "pad_vocab_size",
    "parallelize",
    "reduce_from_tp",
    "reduce_scatter_to_tp_last_dim",
    "reduce_to_sharded_tp",
    "set_default_group_timeout",
    "tp_split_dims",
    "vocab_parallel_cross_entropy",
]
