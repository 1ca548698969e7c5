"""CPU step time of the tensor-parallel schemes, side by side: gloo processes, one run, rounds interleaved.

    python tools/bench_tp.py --model-size 60M --nproc 2 4 --steps 1 --rounds 12 [--json FILE]

One world of ``max(--nproc)`` CPU processes (one thread each, spawned here) holds a TP group of each size
in ``--nproc`` (ranks ``0..n-1``; the other ranks wait at a barrier). Every variant (TP size × scheme
× ``--recompute`` mode) is built first; then each round times every variant once, in an order that
rotates from round to round, so that a busy machine slows them alike: on a shared machine ratios between
schemes are what to read, not absolute times. A step is forward, backward and an AdamW update of one
micro-batch (fp32), on the same tokens on every rank; its time is rank 0's, from a barrier of the TP
group before the step to one after it. The table gives each scheme's median and fastest seconds per
step, and bottleneck / split-rank as the median of the rounds' ratios and as the ratio of the fastest
steps (the least disturbed on a busy machine). Schemes this build does not implement are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.parallel.comm import COLA_TP_SCHEMES
from megatron_cola.parallel.measure import apply_scheme, batch, spawn_gloo
from megatron_cola.parallel.sizes import check_tensor_parallel_size
from megatron_cola.parallel.state import ParallelState


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_tp.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-size", default="60M", help="named size (debug, 60M, ...)")
    p.add_argument("--nproc", nargs="+", type=int, default=[2, 4], help="TP sizes (processes) to time")
    p.add_argument(
        "--cola-tp-scheme",
        nargs="+",
        choices=COLA_TP_SCHEMES,
        default=list(COLA_TP_SCHEMES),
        help="schemes to time (default: both)",
    )
    p.add_argument("--recompute", nargs="+", choices=["none", "full", "cola-m"], default=["none", "cola-m"])
    p.add_argument("--grouped-projections", action="store_true")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the size's")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here (atomically)")
    a = p.parse_args(argv)
    if min(a.nproc) < 2 or min(a.steps, a.rounds, a.seq_length, a.micro_batch_size) < 1:
        p.error("--nproc sizes must be >= 2; --steps, --rounds, --seq-length, --micro-batch-size >= 1")
    try:
        args = model_args(a)
        for n in a.nproc:
            check_tensor_parallel_size(n, model_args=args)
    except ValueError as e:
        p.error(str(e))
    return a


def model_args(a: argparse.Namespace) -> ModelArgs:
    overrides: dict[str, Any] = {"max_seq_length": a.seq_length, "grouped_projections": a.grouped_projections}
    if a.vocab_size:
        overrides["vocab_size"] = a.vocab_size
    return ModelArgs.from_size(a.model_size, **overrides)


def _worker(
    rank: int,
    world: int,
    args: ModelArgs,
    variants: list[tuple[int, str, str]],
    steps: int,
    rounds: int,
    bsz: int,
) -> list[list[float]]:
    """Rank 0's seconds per step of every variant, one list per round (in ``variants`` order)."""
    torch.manual_seed(0)
    groups = {n: dist.new_group(list(range(n))) for n in sorted({v[0] for v in variants})}
    own = [dist.new_group([r]) for r in range(world)][rank]  # DP group of one (every rank creates all)
    tokens, labels = batch(args.vocab_size, bsz, args.max_seq_length)
    runs: dict[int, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for i, (n, scheme, recompute) in enumerate(variants):
        if rank < n:
            state = ParallelState(world_size=n, rank=rank, tp_size=n, tp_group=groups[n], dp_group=own)
            model = apply_scheme(CoLALlama(args.replace(recompute=recompute), seed=1), state, scheme)
            runs[i] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True))

    def step(i: int) -> None:
        model, opt = runs[i]
        model(tokens, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in runs:  # warm-up: allocator, first-call costs
        step(i)
    times: list[list[float]] = []
    for rnd in range(rounds):
        row = [0.0] * len(variants)
        for k in range(len(variants)):
            i = (k + rnd) % len(variants)
            dist.barrier()
            if i in runs:
                group = groups[variants[i][0]]
                dist.barrier(group=group)
                start = time.perf_counter()
                for _ in range(steps):
                    step(i)
                dist.barrier(group=group)
                row[i] = (time.perf_counter() - start) / steps
        times.append(row)
    return times


def summarize(variants: list[tuple[int, str, str]], times: list[list[float]]) -> list[dict[str, Any]]:
    """One row per (TP size, recompute): each scheme's median and fastest s/step, and bottleneck /
    split-rank as the median of the rounds' ratios and as the ratio of the fastest steps."""
    rows = []
    for n, recompute in dict.fromkeys((v[0], v[2]) for v in variants):
        col = {s: i for i, (m, s, r) in enumerate(variants) if (m, r) == (n, recompute)}
        row: dict[str, Any] = {"nproc": n, "recompute": recompute}
        for scheme, i in col.items():
            row[f"{scheme}_s_per_step"] = statistics.median(t[i] for t in times)
            row[f"{scheme}_fastest_s_per_step"] = min(t[i] for t in times)
        if len(col) == 2:
            b, s = col["bottleneck"], col["split-rank"]
            row["bottleneck_over_split_rank"] = statistics.median(t[b] / t[s] for t in times)
            row["bottleneck_over_split_rank_fastest"] = (
                row["bottleneck_fastest_s_per_step"] / row["split-rank_fastest_s_per_step"]
            )
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| processes (TP) | recompute | split-rank s/step median (fastest) "
        "| bottleneck s/step median (fastest) | bottleneck / split-rank: median of rounds (fastest) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[f'{s}_s_per_step']:.3f} ({r[f'{s}_fastest_s_per_step']:.3f})"
            if f"{s}_s_per_step" in r
            else "not in this build"
            for s in COLA_TP_SCHEMES
        ]
        ratio = "-"
        if "bottleneck_over_split_rank" in r:
            ratio = f"{r['bottleneck_over_split_rank']:.2f} ({r['bottleneck_over_split_rank_fastest']:.2f})"
        lines.append(f"| {r['nproc']} | {r['recompute']} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    args = model_args(a)
    schemes = list(a.cola_tp_scheme)
    if not schemes:
        print("bench_tp.py: nothing to time", file=sys.stderr)
        return 2
    variants = [(n, s, r) for n in a.nproc for r in a.recompute for s in schemes]
    world = max(a.nproc)
    times = spawn_gloo(_worker, world, args, variants, a.steps, a.rounds, a.micro_batch_size)
    rows = summarize(variants, times)
    print(
        f"{a.model_size} CoLA, {a.micro_batch_size} x {a.seq_length} tokens, fp32, AdamW; {a.rounds} rounds "
        f"x {a.steps} step(s), interleaved; {world} processes spawned, one thread each\n"
    )
    print(format_rows(rows))
    if a.json:
        result = {"args": vars(a), "variants": variants, "seconds_per_step": times, "rows": rows}
        atomic_write_text(a.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
