"""DeepSpeed's part of a checkpoint: engine/optimizer state with our client state, and the RNG states.

``save_engine_state`` and ``load_engine_state`` wrap ``engine.save_checkpoint``/``load_checkpoint`` with
Megatron's tags (``latest`` is ours, written by ``CheckpointWriter.commit``). During a save DeepSpeed's
checkpoint engine (its seam for where files go: ``engine.checkpoint_engine``) is replaced by
``WriterEngine``, which hands every file to our ``CheckpointWriter``: written now (flushed, fsynced, a
failure recorded with the file and the rank), or snapshotted into host memory for the background writer
(``--async-save``). ``gathered_state_dict`` collects this rank's full parameters whatever the ZeRO stage,
for the model files.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import numpy as np
import torch

from megatron_cola.checkpoint.io import CheckpointReader, CheckpointWriter, HostBuffers, host_copy, snapshot
from megatron_cola.checkpoint.layout import rng_file_name
from megatron_cola.errors import CheckpointError


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states of this process, as tensors and plain types only (so
    the file loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (or the numpy tuple that files before plain types held)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        keys = np_state["keys"].numpy().astype(np.uint32)
        np_state = (
            np_state["kind"],
            keys,
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng_state(writer: CheckpointWriter, global_rank: int) -> None:
    writer.save_torch(rng_file_name(global_rank), rng_state())


def load_rng_state(reader: CheckpointReader, global_rank: int) -> bool:
    """Restore this rank's RNG states if the checkpoint has them; returns whether it did."""
    name = rng_file_name(global_rank)
    if not reader.exists(name):
        return False
    # allow_numpy: RNG files written before the plain-type format hold numpy's state array.
    set_rng_state(reader.load_torch(name, allow_numpy=True))
    return True


def gathered_state_dict(
    engine: Any, zero_stage: int, keep: bool, buffers: HostBuffers | None = None, memo: dict | None = None
) -> dict[str, torch.Tensor]:
    """This rank's (TP-local) full parameters, copied to CPU when ``keep`` (the writing rank). With
    ``buffers`` (a background save) below ZeRO-3 they are snapshotted into them with ``memo``: the
    storages DeepSpeed flattened the parameters into are copied once, and its own state dict, snapshotted
    with the same ``memo``, shares that copy.

    Under ZeRO-3 every rank takes part in gathering, one block (or embedding/norm/head) at a time, so no
    more than one layer is ever materialised beyond the shards.
    """
    module = engine.module
    out: dict[str, torch.Tensor] = {}
    if zero_stage < 3:
        if keep:
            if buffers is not None:
                memo = {} if memo is None else memo
                out = {n: snapshot(p.detach(), memo, buffers) for n, p in module.named_parameters()}
            else:
                out = {n: host_copy(p) for n, p in module.named_parameters()}
        return out
    import deepspeed

    units: list[tuple[str, torch.nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList):
            units += [(f"{name}.{i}", sub) for i, sub in enumerate(child)]
        else:
            units.append((name, child))
    for prefix, unit in units:
        params = list(unit.parameters())
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if keep:
                for n, p in unit.named_parameters():
                    out[f"{prefix}.{n}"] = host_copy(p, buffers)
    return out


class WriterEngine:
    """DeepSpeed's checkpoint-engine interface (``create``/``save``/``commit``/...), routed to a
    ``CheckpointWriter``. ``save`` never raises: a failed write is recorded by the writer, so this rank
    still reaches the barriers inside ``engine.save_checkpoint`` and no other rank is left waiting."""

    def __init__(self, writer: CheckpointWriter, inner: Any) -> None:
        self.writer = writer
        self.inner = inner  # DeepSpeed's own engine, for anything but saving
        self.name = "MegatronColaWriterEngine"

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.writer.write_torch(os.path.relpath(path, self.writer.dir), state_dict, atomic=False)

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.inner.load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return True

    def is_decoupled(self) -> bool:
        return False

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return self.inner.is_data_parallel_writer(dp_rank)

    def preserves_storage_sharing(self) -> bool:
        return True


def save_engine_state(engine: Any, writer: CheckpointWriter, client_state: dict[str, Any]) -> None:
    """DeepSpeed's engine, optimizer and scheduler state plus ``client_state`` into ``writer``'s directory
    (or its ``pending`` snapshots), through ``WriterEngine``."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = WriterEngine(writer, inner)
    try:
        engine.save_checkpoint(writer.root, tag=writer.tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = inner


def engine_state_files(reader: CheckpointReader) -> dict[int, str]:
    """``{tp rank: file holding the client state}``: ``mp_rank_XX_model_states.pt`` for ZeRO 0-2,
    ``zero_pp_rank_0_mp_rank_XX_model_states.pt`` for ZeRO-3."""
    out: dict[int, str] = {}
    for path in reader.glob("*mp_rank_*_model_states.pt"):
        m = re.search(r"(zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$", path)
        if m and (m.group(2) is None or m.group(2) == "0"):
            out.setdefault(int(m.group(3)), path)
    return out


def has_deepspeed_state(reader: CheckpointReader) -> bool:
    """Whether the checkpoint holds DeepSpeed state (a resumable run) or only model files."""
    return bool(engine_state_files(reader))


def peek_client_state(reader: CheckpointReader) -> tuple[dict[str, Any], int]:
    """The client state saved with the engine state, and the TP size it was saved with, read without
    DeepSpeed (so an incompatible run can fail before the engine touches anything)."""
    files = engine_state_files(reader)
    if not files:
        raise CheckpointError(f"{reader.dir} holds no DeepSpeed state (mp_rank_XX_model_states.pt)")
    # DeepSpeed's own file needs pickle: read only to resume a run, after the manifest verified it.
    return reader.load_torch(files[min(files)], trusted=True), len(files)


def load_engine_state(engine: Any, reader: CheckpointReader, load_optimizer_states: bool) -> dict[str, Any]:
    """Load DeepSpeed's state of ``reader``'s checkpoint into ``engine``; returns the client state.

    The LR scheduler's state is always loaded: the schedule continues at the saved iteration even when
    the optimizer starts afresh.
    """
    try:
        _, client_state = engine.load_checkpoint(
            reader.root,
            tag=reader.tag,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=True,
        )
    except (RuntimeError, EOFError, OSError) as e:  # e.g. a truncated file of a pre-manifest checkpoint
        raise CheckpointError(
            f"DeepSpeed could not read checkpoint {reader.dir}: {str(e).splitlines()[0][:200]}; a file is "
            "truncated or corrupted: use an earlier checkpoint"
        ) from e
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {reader.dir}")
    return client_state
