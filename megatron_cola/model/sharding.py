"""Which parameters of a model are shards of a larger tensor: ``ShardSpec`` and ``ShardingPlan``.

This is the one place that knows how each parameter is sharded. A plain model holds an empty plan
(every parameter is its full tensor); ``megatron_cola.parallel.apply_tensor_parallel`` fills the plan
of the model it transforms, keyed by the parameter's name in ``model.named_parameters()``. Everything
that needs to relate a parameter to the full tensor reads the plan:

- ``CoLALlama.init_weights`` draws each full weight from the seed and keeps its shard
  (``load_full_``), so every tensor-parallel layout starts from the same model;
- checkpoint code asks ``full_shape(model, name)`` and loads a full tensor with
  ``load_full_(model, name, full)``; model files record ``split_dims()`` and ``scheme``, which is how a
  checkpoint of any layout and scheme loads into any other (``--finetune``) and how an optimizer state
  is resharded: every cut is an even split of one dim of the full (vocab-padded) tensor;
- DeepSpeed's gradient-norm code reads Megatron's per-parameter flag ``tensor_model_parallel``:
  ``ShardingPlan.mark_parameters`` writes it (and ``partition_dim``/``partition_stride``) from the plan.
  Nothing in this package reads those attributes back.

The plan lives below ``parallel/`` (in ``model/``) because the model's own ``init_weights`` uses it;
it knows nothing about process groups, only ``(parts, index)`` of each split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of a ``full_shape`` tensor split into ``parts`` equal chunks along ``dim``."""

    full_shape: tuple[int, ...]
    dim: int
    parts: int
    index: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[self.dim] //= self.parts
        return tuple(shape)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This shard of ``full`` (a view)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"expected a full tensor of shape {self.full_shape}, got {tuple(full.shape)}")
        return full.chunk(self.parts, dim=self.dim)[self.index]


#: ``ShardingPlan.scheme`` values: no tensor parallelism, Megatron's dense TP (full-rank models), and
#: the two CoLA schemes of ``--cola-tp-scheme`` (docs/tensor_parallel.md).
PLAN_SCHEMES = ("none", "dense", "split-rank", "bottleneck")


@dataclass
class ShardingPlan:
    """``{parameter name: ShardSpec}`` for one rank; names absent from ``specs`` are replicated.

    ``scheme`` names the tensor-parallel scheme the cuts come from (``PLAN_SCHEMES``). Grouped
    projections (``--grouped-projections``) concatenate their members' local shards at run time, so
    they add no parameter and no cut of their own.
    """

    tp_size: int = 1
    tp_rank: int = 0
    specs: dict[str, ShardSpec] = field(default_factory=dict)
    scheme: str = "none"

    def __post_init__(self) -> None:
        if self.scheme not in PLAN_SCHEMES:
            raise ValueError(f"sharding scheme {self.scheme!r}: expected one of {PLAN_SCHEMES}")

    @property
    def is_sharded(self) -> bool:
        return self.tp_size > 1

    def add(self, name: str, spec: ShardSpec) -> None:
        if name in self.specs:
            raise ValueError(f"parameter {name} is already in the sharding plan")
        self.specs[name] = spec

    def dim(self, name: str) -> int | None:
        spec = self.specs.get(name)
        return None if spec is None else spec.dim

    def full_shape(self, name: str, local: torch.Tensor) -> tuple[int, ...]:
        spec = self.specs.get(name)
        return tuple(local.shape) if spec is None else spec.full_shape

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        spec = self.specs.get(name)
        return full if spec is None else spec.shard(full)

    def split_dims(self) -> dict[str, int]:
        """``{name: dim}`` of every sharded parameter (what the model files record)."""
        return {name: spec.dim for name, spec in self.specs.items()}

    def mark_parameters(self, model: nn.Module) -> None:
        """Write Megatron's per-parameter TP flags, which DeepSpeed's gradient-norm code reads
        (``is_model_parallel_parameter``), onto ``model``'s sharded parameters. Idempotent; call it
        again after anything that replaces ``Parameter`` objects (``init_weights`` does)."""
        for name, param in model.named_parameters():
            spec = self.specs.get(name)
            if spec is not None:
                param.tensor_model_parallel = True
                param.partition_dim = spec.dim
                param.partition_stride = 1


def sharding_plan(model: nn.Module) -> ShardingPlan:
    """The plan ``model`` holds (an empty one for a model that has none)."""
    plan = getattr(model, "sharding", None)
    return plan if isinstance(plan, ShardingPlan) else ShardingPlan()


def full_shape(model: nn.Module, name: str) -> tuple[int, ...]:
    """Shape of the full (unsharded) tensor of parameter ``name``."""
    return sharding_plan(model).full_shape(name, model.get_parameter(name))


@torch.no_grad()
def load_full_(model: nn.Module, name: str, full: torch.Tensor) -> None:
    """Copy this rank's shard of the full tensor ``full`` into parameter ``name`` (the one
    "materialise the full weight, then shard" step used by init, conversion and checkpoint loads)."""
    param = model.get_parameter(name)
    param.copy_(sharding_plan(model).shard(name, full).to(device=param.device, dtype=param.dtype))


__all__ = ["PLAN_SCHEMES", "ShardSpec", "ShardingPlan", "full_shape", "load_full_", "sharding_plan"]
