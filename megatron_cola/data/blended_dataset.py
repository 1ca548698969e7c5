"""Blending several datasets by weight, sized and ordered exactly as Megatron-LM core's builder does.

For a split of ``n`` requested samples and normalized weights ``w_k`` (:func:`blend_sizes`):

* the blend has ``sum_k ceil(w_k * n)`` samples (so it can be a few longer than ``n``);
* component ``k`` is built for ``ceil(ceil(w_k * n) * (1 + 0.005))`` samples (Megatron's
  ``mid_level_dataset_surplus``, a margin the greedy order may reach into);
* :class:`BlendedDataset` assigns sample ``i`` to the dataset lagging its weight the most
  (:func:`helpers.build_blending_indices`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_cola.data import helpers
from megatron_cola.errors import DataError

__all__ = ["MID_LEVEL_DATASET_SURPLUS", "BlendedDataset", "blend_sizes"]

#: Each component is asked for this fraction more than its share (Megatron's ``mid_level_dataset_surplus``).
MID_LEVEL_DATASET_SURPLUS = 0.005


def blend_sizes(weights: Sequence[float], num_samples: int) -> tuple[list[int], list[int], int]:
    """``(targets, requests, size)`` for a blend of ``num_samples``: per component the samples the blend
    plans to take, ``ceil(w_k * n)``, and the samples it is built for, ``ceil(target * 1.005)``, and the
    blend's length ``sum(targets)``. ``weights`` must be normalized."""
    targets = [int(math.ceil(num_samples * float(w))) for w in weights]
    requests = [int(math.ceil(t * (1 + MID_LEVEL_DATASET_SURPLUS))) for t in targets]
    return targets, requests, sum(targets)


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalized), in the
    deterministic greedy order of :func:`helpers.build_blending_indices`. ``ds[i]`` is the component's
    sample; ``dataset_index[i]`` / ``dataset_sample_index[i]`` say where it came from."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], size: int) -> None:
        if len(datasets) == 0:
            raise ValueError("BlendedDataset needs at least one dataset")
        if len(weights) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        index_dtype = np.uint8 if len(datasets) <= 256 else np.int16
        self.dataset_index = np.zeros(self.size, dtype=index_dtype)
        self.dataset_sample_index = np.zeros(self.size, dtype=np.int64)
        helpers.build_blending_indices(
            self.dataset_index, self.dataset_sample_index, self.weights, len(datasets), self.size
        )
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (count, ds) in enumerate(zip(counts, self.datasets)):
            if count > len(ds):
                raise DataError(
                    f"blended dataset {d} ({ds!r}) has {len(ds)} samples but the blend needs {count}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        i = int(idx)
        if not 0 <= i < self.size:
            raise IndexError(f"sample {idx} out of range for blended dataset of {self.size} samples")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def __repr__(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        return f"BlendedDataset({len(self.datasets)} datasets, weights=[{weights}], size={self.size})"
