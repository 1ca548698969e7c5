"""Tensor-parallel communication per token per block: CoLA TP vs Megatron's dense TP (analytic).

    python tools/comm_bytes.py --model-size 7B --tp 2 4 8
    python tools/comm_bytes.py --model-size 1B 7B --tp 2 4 8 --dtype fp32 --recompute cola-m

Bytes are what each rank sends under the ring algorithm (all-reduce 2(t-1)/t·n, all-gather and
reduce-scatter (t-1)/t·n), forward + backward; see megatron_cola/parallel/comm.py and
docs/tensor_parallel.md. ``CommCounter`` measures the same numbers on a real run.
"""

from __future__ import annotations

import argparse

from megatron_cola.config import ModelArgs
from megatron_cola.parallel.comm import block_comm_volume, comm_table, format_comm_table
from megatron_cola.parallel.sizes import check_tensor_parallel_size

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", nargs="+", default=["1B", "7B"], help="named sizes (debug, 60M, ..., 7B)")
    p.add_argument("--tp", nargs="+", type=int, default=[2, 4, 8], help="tensor-model-parallel sizes")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="activation dtype")
    p.add_argument("--recompute", choices=["none", "full", "cola-m"], default="none")
    a = p.parse_args(argv)
    for size in a.model_size:
        try:
            ModelArgs.from_size(size)
        except ValueError as e:
            p.error(str(e))
    if any(t < 1 for t in a.tp):
        p.error(f"--tp sizes must be >= 1, got {a.tp}")
    rows = comm_table(tuple(a.model_size), tuple(a.tp), DTYPE_BYTES[a.dtype], a.recompute)
    note = " (dense: full)" if a.recompute == "cola-m" else ""
    print(f"bytes sent per rank per token per block, fwd+bwd, {a.dtype}, recompute={a.recompute}{note}\n")
    print(format_comm_table(rows))
    print()
    for size in a.model_size:
        args = ModelArgs.from_size(size)
        fwd, bwd = block_comm_volume(args, "cola", a.recompute)
        print(
            f"{size}: CoLA TP per block (elements/token): fwd all-reduce {fwd.all_reduce}, all-gather "
            f"{fwd.all_gather}, reduce-scatter {fwd.reduce_scatter}; bwd all-reduce {bwd.all_reduce}, "
            f"all-gather {bwd.all_gather}, reduce-scatter {bwd.reduce_scatter}"
        )
        for t in a.tp:
            try:
                check_tensor_parallel_size(t, model_args=args)
            except ValueError as e:
                print(f"  note, TP={t}: {e}")
