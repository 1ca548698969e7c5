"""How a model parameter's full (unsharded) tensor relates to the shard this rank holds.

The only place in ``checkpoint/`` that reads tensor-parallel sharding metadata, so re-pointing it (e.g. at
a registry in ``model/``/``parallel/``) changes these two functions and nothing else. The signatures take
the model and a parameter name, as a registry keyed by name would.
"""

from __future__ import annotations

import torch


def full_shape(model: torch.nn.Module, name: str) -> tuple[int, ...]:
    """The shape of the full tensor parameter ``name`` is a shard of (its own shape when not sharded)."""
    param = model.get_parameter(name)
    return tuple(getattr(param, "full_shape", param.shape))


@torch.no_grad()
def load_full_(model: torch.nn.Module, name: str, full: torch.Tensor) -> None:
    """Copy this rank's shard of ``full`` into parameter ``name`` (all of it when not sharded)."""
    param = model.get_parameter(name)
    shard_fn = getattr(param, "shard_fn", None)
    value = shard_fn(full) if shard_fn is not None else full
    param.copy_(value.to(dtype=param.dtype, device=param.device))
