"""Run several pre-training jobs one after another in one launch (one process per rank), for tests that
need many short runs: the imports and the process group are paid once.

    python -m torch.distributed.run --nproc_per_node N tests/run_many.py SPEC.json

``SPEC.json``: ``{"out": PATH, "runs": [{"key": K, "args": [...], "latest": [DIR, TAG] | null}]}``. Before
a run whose ``latest`` is set, rank 0 points ``DIR/latest`` at ``TAG`` (to resume from an earlier save of a
longer run). Each run's output starts with a line ``=== run K``; rank 0 writes ``{K: {iteration: loss}}``
to ``out``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.training.pretrain import init_distributed, pretrain


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    init_distributed(torch.device("cpu"))
    rank = dist.get_rank()
    results: dict[str, dict[int, float]] = {}
    for run in spec["runs"]:
        if run.get("latest"):
            directory, tag = run["latest"]
            if rank == 0:
                atomic_write_text(os.path.join(directory, "latest"), tag + "\n")
            dist.barrier()
        print(f"=== run {run['key']}", flush=True)
        history = pretrain(run["args"])
        results[run["key"]] = {int(it): float(loss) for it, loss in history["train"]}
        sys.stdout.flush()
    if rank == 0:
        atomic_write_text(spec["out"], json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
