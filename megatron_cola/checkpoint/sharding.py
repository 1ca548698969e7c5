"""How a model parameter's full (unsharded) tensor relates to the shard this rank holds.

The only place in ``checkpoint/`` that reads the sharding metadata tensor parallelism attaches to a
parameter, so re-pointing it (e.g. at a registry in ``parallel/``) is a change to these two functions.
"""

from __future__ import annotations

import torch


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The shape of the full tensor ``param`` is a shard of (its own shape when it is not sharded)."""
    return tuple(getattr(param, "full_shape", param.shape))


def shard_of(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` for ``param`` (``full`` itself when ``param`` is not sharded)."""
    shard_fn = getattr(param, "shard_fn", None)
    return shard_fn(full) if shard_fn is not None else full
