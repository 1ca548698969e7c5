"""Tensor parallelism measured on real process groups: bytes and collectives per block, and what each
rank keeps for backward, for every scheme this build implements.

- ``apply_scheme(model, state, scheme)``: tensor parallelism under one scheme, as a training run applies it.
- ``measure_case(state, args, scheme)``: one forward + backward of a 1-layer and of a 2-layer model
  under ``CommCounter``. Their difference is one block, whatever the embedding, head and loss do; the
  1-layer run less that block is the rest. Then ``saved_activations_of`` on the 2-layer model.
- ``spawn_gloo(fn, world_size, *args)``: runs ``fn(rank, world_size, *args)`` in that many CPU
  processes of one gloo world and returns rank 0's (JSON-able) result.
- ``measure_tp(tp_size, cases)``: ``measure_case`` for each case, on ``tp_size`` spawned processes.

Used by ``tools/comm_bytes.py --measure``, ``tools/bench_tp.py`` and tests/test_comm_bytes.py.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cola.config import DEFAULT_TP_SCHEME, ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.activation_memory import saved_activations_of
from megatron_cola.parallel.comm import canonical_scheme
from megatron_cola.parallel.counter import CommCounter
from megatron_cola.parallel.parallelize import parallelize
from megatron_cola.parallel.state import ParallelState


def apply_scheme(model: CoLALlama, state: ParallelState, scheme: str) -> CoLALlama:
    """Tensor parallelism under ``scheme`` as a training run applies it (``parallelize``: TP, then the
    model's recompute mode). ``dense`` needs a full-rank model (which every scheme splits the dense way)."""
    scheme = canonical_scheme(scheme)
    kind = "full-rank" if model.args.full_rank else "CoLA"
    if (scheme == "dense") != model.args.full_rank:
        raise ValueError(f"TP scheme {scheme!r} does not apply to a {kind} model")
    return parallelize(model, state, scheme=DEFAULT_TP_SCHEME if scheme == "dense" else scheme)


@dataclass(frozen=True)
class Case:
    """One measurement: a scheme (``dense``: the full-rank model) with a recompute mode and grouping."""

    scheme: str
    recompute: str = "none"
    grouped_projections: bool = False

    def model_args(self, base: ModelArgs) -> ModelArgs:
        return base.replace(
            full_rank=self.scheme == "dense",
            recompute=self.recompute,
            grouped_projections=self.grouped_projections,
        )


def batch(vocab_size: int, bsz: int, seq_length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random tokens (and next-token labels) on every rank."""
    tokens = torch.randint(0, vocab_size, (bsz, seq_length), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.roll(tokens, -1, dims=1)


def measure_case(
    state: ParallelState, base: ModelArgs, case: Case, seq_length: int = 16, bsz: int = 2
) -> dict[str, Any]:
    """Measured fp32 ring bytes and collectives per token of one block and of the rest of the model
    (embedding, final norm, head, loss), and the saved activations per token per layer on this rank."""
    args = case.model_args(base)
    tokens, labels = batch(args.vocab_size, bsz, seq_length)
    runs = []
    for layers in (1, 2):
        with torch.device("meta"):  # each rank draws only its shards (a 7B block fits any TP size)
            model = CoLALlama(args.replace(num_layers=layers))
        model = apply_scheme(model, state, case.scheme)
        model.to_empty(device="cpu")
        model.init_weights(1)
        with CommCounter() as counter:
            model(tokens, labels).backward()
        runs.append((counter.total_bytes / tokens.numel(), len(counter.records)))
    saved = saved_activations_of(model, tokens, labels)
    (one_bytes, one_calls), (two_bytes, two_calls) = runs
    return {
        "scheme": case.scheme,
        "recompute": case.recompute,
        "grouped_projections": case.grouped_projections,
        "tp": state.tp_size,
        "dtype_bytes": 4,
        "block_bytes": two_bytes - one_bytes,
        "block_collectives": two_calls - one_calls,
        "outside_bytes": 2 * one_bytes - two_bytes,
        "outside_collectives": 2 * one_calls - two_calls,
        "saved_elements": saved.elements_per_token,
        "saved_tensors": saved.num_tensors / args.num_layers,
    }


# ---------------------------------------------------------------------- spawned gloo worlds
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(
    rank: int, world_size: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=600))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn: Callable[..., Any], world_size: int, *args: Any) -> Any:
    """Run ``fn(rank, world_size, *args)`` (a module-level function) in ``world_size`` CPU processes of one
    gloo world, one thread each; return rank 0's result (JSON-able)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        mp.spawn(_gloo_worker, args=(world_size, _free_port(), out, fn, args), nprocs=world_size, join=True)
        return json.loads(Path(out).read_text())


def _measure_worker(
    rank: int, world_size: int, base: ModelArgs, cases: list[Case], seq_length: int, bsz: int
) -> list[dict[str, Any]]:
    state = ParallelState.from_torch_distributed(world_size)
    return [measure_case(state, base, case, seq_length, bsz) for case in cases]


def measure_tp(
    base: ModelArgs, tp_size: int, cases: list[Case], seq_length: int = 16, bsz: int = 2
) -> list[dict[str, Any]]:
    """``measure_case`` for every case on ``tp_size`` spawned gloo processes (rank 0's numbers)."""
    return spawn_gloo(_measure_worker, tp_size, base, cases, seq_length, bsz)


__all__ = [
    "Case",
    "apply_scheme",
    "batch",
    "measure_case",
    "measure_tp",
    "spawn_gloo",
]
