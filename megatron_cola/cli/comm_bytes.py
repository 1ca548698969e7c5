"""Tensor-parallel communication per token per block: the CoLA schemes vs Megatron's dense TP.

    python tools/comm_bytes.py --model-size 1B 7B --tp 2 4 8 [--cola-tp-scheme all] [--grouped-projections]
    python tools/comm_bytes.py --recompute cola-m --dtype fp32 --json comm.json
    python tools/comm_bytes.py --measure [--measure-model-size debug] [--tp 2 4]

Analytic (megatron_cola/parallel/comm.py): bytes are what each rank sends under the ring algorithm
(all-reduce 2(t-1)/t·n, all-gather and reduce-scatter (t-1)/t·n), forward + backward, per token and
block, next to the number of collectives per block; ``dense`` is Megatron's TP of the full-rank model of
the same size. ``--json [FILE]`` writes one object per size × TP × scheme (``cola_bytes``,
``dense_bytes``, ``ratio``, ``collectives``, ...; to stdout without FILE).

``--measure`` runs one forward and backward of the ``--measure-model-size`` model (1 and 2 layers: the
difference is one block) on real TP ranks (gloo processes spawned here, one per rank, for each ``--tp``
the model allows), counts every collective with ``CommCounter`` and prints the measured fp32 bytes and
collectives next to the analytic ones, with the activations each rank keeps for backward (recompute
none and cola-m). A scheme this build does not implement yet is reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.config import ModelArgs
from megatron_cola.model.activation_memory import cola_m_kept_per_rank
from megatron_cola.parallel.comm import (
    COLA_TP_SCHEMES,
    block_collectives,
    block_comm_bytes_per_token,
    comm_table,
    format_comm_table,
    outside_blocks_volume,
)
from megatron_cola.parallel.measure import Case, measure_tp
from megatron_cola.parallel.sizes import check_tensor_parallel_size

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="comm_bytes.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model-size", nargs="+", default=["1B", "7B"], help="named sizes (debug, 60M, ..., 7B)")
    p.add_argument("--tp", nargs="+", type=int, default=[2, 4, 8], help="tensor-model-parallel sizes")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="activation dtype")
    p.add_argument("--recompute", choices=["none", "full", "cola-m"], default="none")
    p.add_argument(
        "--cola-tp-scheme",
        choices=[*COLA_TP_SCHEMES, "all"],
        default="all",
        help="CoLA tensor-parallel scheme(s) to show next to dense TP (default: all)",
    )
    p.add_argument("--grouped-projections", action="store_true", help="q/k/v and gate/up grouped per map")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="write the rows as JSON (stdout: -)",
    )
    p.add_argument("--measure", action="store_true", help="also measure on real TP ranks (gloo, CPU)")
    p.add_argument(
        "--measure-model-size", default="debug", help="model measured by --measure (default debug)"
    )
    p.add_argument("--measure-seq-length", type=int, default=16, help="tokens per sequence (2 sequences)")
    p.add_argument(
        "--measure-recompute",
        nargs="+",
        choices=["none", "full", "cola-m"],
        default=["none", "cola-m"],
        help="recompute modes measured (dense: cola-m is measured as full)",
    )
    p.add_argument(
        "--measure-vocab-size", type=int, default=None, help="default: the size's (no effect per block)"
    )
    p.add_argument(
        "--measure-ffn-hidden-size",
        type=int,
        default=None,
        help="default: the size's (1B's 5461 divides by no t)",
    )
    a = p.parse_args(argv)
    try:
        for size in a.model_size:
            ModelArgs.from_size(size)
        measure_args(a)
    except ValueError as e:
        p.error(str(e))
    if any(t < 1 for t in a.tp):
        p.error(f"--tp sizes must be >= 1, got {a.tp}")
    if a.measure_seq_length < 1:
        p.error(f"--measure-seq-length must be >= 1, got {a.measure_seq_length}")
    return a


def measure_args(a: argparse.Namespace) -> ModelArgs:
    """The model ``--measure`` runs (``--measure-model-size`` with its overrides)."""
    overrides: dict[str, Any] = {"grouped_projections": a.grouped_projections}
    if a.measure_vocab_size:
        overrides["vocab_size"] = a.measure_vocab_size
    if a.measure_ffn_hidden_size:
        overrides["ffn_hidden_size"] = a.measure_ffn_hidden_size
    return ModelArgs.from_size(a.measure_model_size, **overrides)


def measured_rows(
    base: ModelArgs,
    size: str,
    tp_sizes: list[int],
    schemes: tuple[str, ...],
    seq_length: int,
    recompute: tuple[str, ...] = ("none", "cola-m"),
) -> tuple[list[dict[str, Any]], list[str]]:
    """Measured rows (one per TP × scheme × ``recompute``; dense measures ``full`` for ``cola-m``) and
    notes on the TP sizes that could not be measured."""
    grouped = base.grouped_projections
    notes: list[str] = []
    cases = [Case(s, r, grouped) for s in schemes for r in recompute]
    dense_modes = dict.fromkeys("full" if r == "cola-m" else r for r in recompute)
    cases += [Case("dense", r, grouped) for r in dense_modes]
    rows: list[dict[str, Any]] = []
    for t in tp_sizes:
        try:
            check_tensor_parallel_size(t, model_args=base)
        except ValueError as e:
            notes.append(f"TP={t} not measured: {e}")
            continue
        if t == 1:
            continue
        measured = measure_tp(base, t, cases, seq_length=seq_length)
        dense = {m["recompute"]: m for m in measured if m["scheme"] == "dense"}
        for case, m in zip(cases, measured, strict=True):
            args = case.model_args(base)
            acts, loss = outside_blocks_volume(args, case.scheme)
            ref = dense["full" if case.recompute == "cola-m" else case.recompute]
            rows.append(
                {
                    "source": "measured",
                    "size": size,
                    "tp": t,
                    "scheme": case.scheme,
                    "grouped_projections": grouped,
                    "recompute": case.recompute,
                    "dtype_bytes": 4,
                    "cola_bytes": m["block_bytes"],
                    "dense_bytes": ref["block_bytes"],
                    "ratio": m["block_bytes"] / ref["block_bytes"],
                    "collectives": m["block_collectives"],
                    "dense_collectives": ref["block_collectives"],
                    "analytic_bytes": block_comm_bytes_per_token(args, t, case.scheme, 4, case.recompute),
                    "analytic_collectives": block_collectives(args, case.scheme, case.recompute),
                    "outside_bytes": m["outside_bytes"],
                    "analytic_outside_bytes": acts.ring_bytes(t, 4) + loss.ring_bytes(t, 4),
                    "saved_elements_per_token_per_layer": m["saved_elements"],
                    "analytic_cola_m_kept": (
                        cola_m_kept_per_rank(args, t, case.scheme) if case.recompute == "cola-m" else None
                    ),
                }
            )
    return rows, notes


def format_measured(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| TP | scheme | recompute | B/tok/block measured (analytic) | / dense | collectives/block measured "
        "(analytic) | rest of model B/tok measured (analytic) | saved elements/tok/layer per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = "" if r["analytic_cola_m_kept"] is None else f" (analytic {r['analytic_cola_m_kept']:g})"
        lines.append(
            f"| {r['tp']} | {r['scheme']} | {r['recompute']} | {r['cola_bytes']:g} ({r['analytic_bytes']:g}) "
            f"| {r['ratio']:.3f} | {r['collectives']} ({r['analytic_collectives']}) "
            f"| {r['outside_bytes']:g} ({r['analytic_outside_bytes']:g}) "
            f"| {r['saved_elements_per_token_per_layer']:g}{kept} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    schemes = COLA_TP_SCHEMES if a.cola_tp_scheme == "all" else (a.cola_tp_scheme,)
    rows: list[dict[str, Any]] = [
        {"source": "analytic", **row}
        for row in comm_table(
            tuple(a.model_size),
            tuple(a.tp),
            DTYPE_BYTES[a.dtype],
            a.recompute,
            schemes,
            a.grouped_projections,
        )
    ]
    to_stdout = a.json == "-"
    out = sys.stderr if to_stdout else sys.stdout
    note = " (dense: full)" if a.recompute == "cola-m" else ""
    grouped = ", grouped projections" if a.grouped_projections else ""
    title = f"bytes sent per rank per token per block, fwd+bwd, {a.dtype}, recompute={a.recompute}"
    print(f"{title}{note}{grouped}\n", file=out)
    print(format_comm_table(rows), file=out)
    for size in a.model_size:
        args = ModelArgs.from_size(size)
        for t in a.tp:
            try:
                check_tensor_parallel_size(t, model_args=args)
            except ValueError as e:
                print(f"  note, {size} TP={t}: {e}", file=out)
    if a.measure:
        base = measure_args(a)
        measured, notes = measured_rows(
            base, a.measure_model_size, a.tp, schemes, a.measure_seq_length, tuple(a.measure_recompute)
        )
        print(
            f"\nmeasured: {a.measure_model_size} model (d {base.hidden_size}, r {base.cola_rank}, ffn "
            f"{base.ffn_hidden_size}, vocab {base.vocab_size}) on real TP ranks (gloo, CPU), fp32, 2 x "
            f"{a.measure_seq_length} tokens; CommCounter, one block = 2 layers - 1 layer\n",
            file=out,
        )
        print(format_measured(measured), file=out)
        for n in notes:
            print(f"  note: {n}", file=out)
        rows += measured
    if a.json is not None:
        text = json.dumps(rows, indent=1) + "\n"
        if to_stdout:
            sys.stdout.write(text)
        else:
            atomic_write_text(a.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
