"""Resumable batch sampler for pre-training (Megatron-LM's ``MegatronPretrainingSampler`` semantics).

Global sample order is simply ``consumed_samples, consumed_samples + 1, ...`` (the datasets are already
shuffled by their shuffle index). Each step takes ``micro_batch_size * data_parallel_size`` consecutive
indices and hands data-parallel rank ``r`` the slice ``[r * mbs, (r + 1) * mbs)``. Starting from
``consumed_samples`` therefore yields exactly the micro-batches an uninterrupted run would yield next.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["PretrainingSampler"]


class PretrainingSampler:
    """Yields lists of ``micro_batch_size`` dataset indices for one data-parallel rank.

    Use as ``DataLoader(dataset, batch_sampler=PretrainingSampler(...))``. With ``drop_last=False`` a final
    incomplete global batch is split the same way (this rank's slice may be short or empty; empty slices
    are not yielded).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be smaller than total_samples "
                f"({total_samples}): "
                "the dataset is exhausted; build it with more samples to train longer"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise ValueError(f"data_parallel_size must be positive, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank must be in [0, {data_parallel_size}), got {data_parallel_rank}"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = bool(drop_last)
        self.global_micro_batch = self.micro_batch_size * self.data_parallel_size

    def _slice(self) -> tuple[int, int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return start, start + self.micro_batch_size

    def __len__(self) -> int:
        """Number of micro-batches this rank will get."""
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.global_micro_batch)
        if not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size:
            full += 1
        return full

    def __iter__(self) -> Iterator[list[int]]:
        start, end = self._slice()
        step = self.global_micro_batch
        first = self.consumed_samples
        last_full = first + (self.total_samples - first) // step * step
        for base in range(first, last_full, step):
            yield list(range(base + start, base + end))
        if not self.drop_last and last_full < self.total_samples:
            tail = list(range(last_full, self.total_samples))[start:end]
            if tail:
                yield tail
