"""Names inside a checkpoint root: iteration tags, per-rank file names and the ``latest`` markers."""

from __future__ import annotations

import os

from megatron_cola.errors import CheckpointError

LATEST_FILE = "latest"
LATEST_ITERATION_FILE = "latest_checkpointed_iteration.txt"


def iteration_tag(iteration: int) -> str:
    """Megatron's checkpoint directory name for ``iteration``."""
    return f"iter_{iteration:07d}"


def model_file_name(tp_rank: int) -> str:
    """The model-weight file of tensor-parallel rank ``tp_rank``."""
    return f"model_tp{tp_rank:02d}.pt"


def optim_file_name(tp_rank: int) -> str:
    """The layout-free optimizer-state file of tensor-parallel rank ``tp_rank`` (``optim_state``)."""
    return f"optim_tp{tp_rank:02d}.pt"


def rng_file_name(global_rank: int) -> str:
    """The RNG-state file of global rank ``global_rank``."""
    return f"rng_state_{global_rank:05d}.pt"


def read_latest(load_dir: str) -> str | None:
    """The tag named by ``{load_dir}/latest``, or ``None`` when there is no complete checkpoint."""
    path = os.path.join(load_dir, LATEST_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def resolve_checkpoint_dir(load_dir: str, iteration: int | None = None) -> str:
    """The directory of the checkpoint to read: ``iteration`` if given, else the one ``latest`` names.

    Raises ``CheckpointError`` naming what is missing.
    """
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir} does not exist")
    if iteration is not None:
        tag = iteration_tag(iteration)
    else:
        tag = read_latest(load_dir)
        if tag is None:
            raise CheckpointError(
                f"{load_dir} has no '{LATEST_FILE}' file: no complete checkpoint was saved there "
                "(pass --iteration N to read a specific one)"
            )
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path
