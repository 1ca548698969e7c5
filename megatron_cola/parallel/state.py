"""Process groups as explicit objects: ``ParallelState`` and the ``mpu`` adapter DeepSpeed expects.

Layout (as in Megatron-LM without pipeline parallelism): the ``tp`` ranks of one tensor-parallel group
are consecutive global ranks, ``[g // tp * tp, ..., g // tp * tp + tp - 1]``; the data-parallel group of
rank ``g`` holds the ranks with the same TP rank, ``[g % tp, g % tp + tp, ...]``. With 4 ranks and
``tp=2``: TP groups ``[0, 1], [2, 3]``; DP groups ``[0, 2], [1, 3]``.

Nothing here is a module global: build a ``ParallelState`` once (``from_torch_distributed`` after
``torch.distributed.init_process_group``, or ``single()`` for a one-process run) and pass it to whatever
needs it (``apply_tensor_parallel``, the training loop, DeepSpeed via ``state.mpu()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import ProcessGroup

from megatron_cola.parallel.sizes import check_tensor_parallel_size


def tensor_parallel_ranks(world_size: int, tp_size: int) -> list[list[int]]:
    """Global ranks of every TP group: consecutive blocks of ``tp_size``."""
    check_tensor_parallel_size(tp_size, world_size)
    return [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]


def data_parallel_ranks(world_size: int, tp_size: int) -> list[list[int]]:
    """Global ranks of every DP group: the ranks sharing one TP rank (stride ``tp_size``)."""
    check_tensor_parallel_size(tp_size, world_size)
    return [list(range(tp_rank, world_size, tp_size)) for tp_rank in range(tp_size)]


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits in the (data × tensor) parallel grid, and the groups it talks in.

    ``tp_group`` / ``dp_group`` are ``None`` only in a one-process state (``single()``); every mapping
    treats a ``None`` group or a group of size 1 as "no communication".
    """

    world_size: int
    rank: int
    tp_size: int
    tp_group: ProcessGroup | None = field(default=None, compare=False)
    dp_group: ProcessGroup | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_tensor_parallel_size(self.tp_size, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.world_size > 1 and (self.tp_group is None or self.dp_group is None):
            # A missing group would make every mapping the identity: a silently wrong model.
            raise ValueError(
                "a multi-process ParallelState needs its TP and DP groups; build it with "
                "ParallelState.from_torch_distributed(tp_size)"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls) -> ParallelState:
        """One process, no groups, ``tp = dp = 1``."""
        return cls(world_size=1, rank=0, tp_size=1)

    @classmethod
    def from_torch_distributed(
        cls, tp_size: int, backend: str | None = None, timeout: timedelta | None = None
    ) -> ParallelState:
        """Create the TP and DP groups of the initialised default process group.

        Collective: every rank must call it, with the same ``tp_size`` (``dist.new_group`` is called for
        every group on every rank, in the same order). ``timeout`` (``--distributed-timeout-minutes``) is
        how long a collective of these groups may wait; ``None``: torch's default for the backend.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ParallelState.from_torch_distributed needs torch.distributed to be initialised "
                "(deepspeed.init_distributed() or torch.distributed.init_process_group()) first; "
                "use ParallelState.single() for a one-process run"
            )
        world_size, rank = dist.get_world_size(), dist.get_rank()
        check_tensor_parallel_size(tp_size, world_size)
        tp_group = dp_group = None
        for ranks in tensor_parallel_ranks(world_size, tp_size):
            group = dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
            if rank in ranks:
                tp_group = group
        for ranks in data_parallel_ranks(world_size, tp_size):
            group = dist.new_group(ranks=ranks, backend=backend, timeout=timeout)
            if rank in ranks:
                dp_group = group
        return cls(world_size=world_size, rank=rank, tp_size=tp_size, tp_group=tp_group, dp_group=dp_group)

    # ------------------------------------------------------------------ derived
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_ranks(self) -> list[int]:
        """Global ranks of this process's TP group."""
        start = self.rank // self.tp_size * self.tp_size
        return list(range(start, start + self.tp_size))

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks of this process's DP group."""
        return list(range(self.tp_rank, self.world_size, self.tp_size))

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 of this group (the source of broadcasts within the group)."""
        return self.tp_ranks[0]

    def mpu(self) -> DeepSpeedMPU:
        """The adapter to pass as ``deepspeed.initialize(..., mpu=state.mpu())``."""
        return DeepSpeedMPU(self)

    def __repr__(self) -> str:
        return (
            f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
            f"dp={self.dp_rank}/{self.dp_size})"
        )


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the default of every process group created from now on without one.

    DeepSpeed creates groups of its own (ZeRO, expert and sequence groups) with ``dist.new_group(ranks)``,
    which takes torch's per-backend default (30 minutes for gloo, 10 for NCCL), not the default group's
    timeout. torch reads that default from two module attributes of ``distributed_c10d`` at each call,
    so setting them is the one place where ``--distributed-timeout-minutes`` reaches DeepSpeed's groups.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


class DeepSpeedMPU:
    """The "model parallel unit" DeepSpeed accepts as ``mpu``: TP is the model-parallel dimension.

    With it, ZeRO partitions optimizer state and reduces gradients over the DP group only, and the
    gradient norm (clipping, ``get_global_grad_norm``) sums the squares of parameters marked
    ``tensor_model_parallel`` on every TP rank and of the other (replicated) parameters on TP rank 0
    only, then all-reduces over the TP group: the norm of the whole model, nothing counted twice.
    There is no pipeline or sequence parallelism; deliberately no ``initialize_sequence_parallel``
    (DeepSpeed would then ignore the DP group).
    """

    def __init__(self, state: ParallelState) -> None:
        self.state = state

    # model parallel = tensor parallel (no pipeline)
    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    def get_model_parallel_group(self) -> ProcessGroup | None:
        return self.state.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.state.tp_size

    def get_tensor_model_parallel_group(self) -> ProcessGroup | None:
        return self.state.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.tp_src_rank

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp_size

    def get_data_parallel_group(self) -> ProcessGroup | None:
        return self.state.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.state.dp_ranks

    # no pipeline parallelism
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def __repr__(self) -> str:
        return f"DeepSpeedMPU({self.state!r})"


__all__ = [
    "DeepSpeedMPU",
    "ParallelState",
    "data_parallel_ranks",
    "set_default_group_timeout",
    "tensor_parallel_ranks",
]
