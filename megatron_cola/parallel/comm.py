"""Analytic communication model of tensor parallelism: bytes moved per token, per block and per model.

Counts follow ``megatron_cola.parallel.counter``: the *ring* bytes each rank sends (all-reduce
``2 (t-1)/t · n``, all-gather / reduce-scatter ``(t-1)/t · n``, ``n`` the full tensor's bytes). Schemes,
per token per block (``d`` hidden, ``f`` ffn, ``r`` CoLA rank; fwd + bwd):

``dense``  Megatron on the full-rank model: all-reduce of d after o and down (fwd) and at the attention
           and MLP inputs (bwd): 4 all-reduces of d.
``cola``   ours (docs/tensor_parallel.md): fwd 5 all-gathers of r (q, k, v, gate, up bottlenecks),
           2 reduce-scatters of r (o, down bottlenecks), 2 all-reduces of d (o, down outputs); bwd the
           conjugates: 5 reduce-scatters and 2 all-gathers of r, and 2 all-reduces of d at the attention /
           MLP inputs. Ring bytes: ``(t-1)/t · (8 d + 14 r)`` elements vs dense ``(t-1)/t · 8 d``: ratio
           ``1 + 1.75 r/d`` (1.4375 at the paper's r = d/4).
``naive``  CoLA with every layer split over r alone (A column-, B row-parallel): all-reduce of each
           layer's output (fwd) and input gradient (bwd, shared by q/k/v and by gate/up):
           ``5d + 2f`` + ``3d + f`` all-reduced elements, and attention / SwiGLU replicated on every rank.

Activation recomputation re-runs forward collectives in backward (``block_comm_volume`` says which:
``full`` all but the block's closing all-reduce, ``cola-m`` only the 5 all-gathers of r). Outside the
blocks: the vocab-parallel embedding all-reduces d (fwd), the LM head's input gradient d (bwd), and the
loss 3 fp32 numbers per token (max; target logit and sum of exponentials).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_cola.config import ModelArgs
from megatron_cola.model.recompute import check_recompute_mode
from megatron_cola.parallel.counter import ring_factor

SCHEMES = ("cola", "dense", "naive")


@dataclass(frozen=True)
class CommVolume:
    """Elements per token of the full tensors each collective kind moves."""

    all_reduce: int = 0
    all_gather: int = 0
    reduce_scatter: int = 0

    def __add__(self, other: CommVolume) -> CommVolume:
        return CommVolume(
            self.all_reduce + other.all_reduce,
            self.all_gather + other.all_gather,
            self.reduce_scatter + other.reduce_scatter,
        )

    def ring_bytes(self, tp_size: int, elem_bytes: int) -> float:
        """Bytes each rank sends per token under the ring algorithm."""
        return elem_bytes * (
            self.all_reduce * ring_factor("all_reduce", tp_size)
            + self.all_gather * ring_factor("all_gather", tp_size)
            + self.reduce_scatter * ring_factor("reduce_scatter", tp_size)
        )


def _default_scheme(args: ModelArgs) -> str:
    return "dense" if args.full_rank else "cola"


def block_comm_volume(
    args: ModelArgs, scheme: str | None = None, recompute: str | None = None
) -> tuple[CommVolume, CommVolume]:
    """``(forward, backward)`` volume of one block, per token; recomputed forwards count in backward."""
    scheme = scheme or _default_scheme(args)
    recompute = args.recompute if recompute is None else recompute
    d, f, r = args.hidden_size, args.ffn_hidden_size, args.cola_rank
    if scheme == "cola":
        fwd = CommVolume(all_reduce=2 * d, all_gather=5 * r, reduce_scatter=2 * r)
        bwd = CommVolume(all_reduce=2 * d, all_gather=2 * r, reduce_scatter=5 * r)
    elif scheme == "dense":
        fwd = CommVolume(all_reduce=2 * d)
        bwd = CommVolume(all_reduce=2 * d)
    elif scheme == "naive":
        fwd = CommVolume(all_reduce=5 * d + 2 * f)
        bwd = CommVolume(all_reduce=3 * d + f)
    else:
        raise ValueError(f"unknown TP scheme {scheme!r}; allowed: {list(SCHEMES)}")
    # Recomputation re-runs forward collectives in backward. Never the all-reduce of d that closes each
    # checkpointed region: nothing saved inside the region needs its output, and torch's non-reentrant
    # checkpoint stops recomputing once every saved tensor is back (early stop). ``full`` has one region
    # per block; ``cola-m`` one per half-block, and it replays each A projection's kept output, which
    # for o / down already includes the reduce-scatter (one kept op): only the
    # all-gathers of the rank-r activations (and, naive / dense, the all-reduces feeding the attention
    # or SwiGLU) are redone.
    if recompute == "full":
        bwd = bwd + CommVolume(fwd.all_reduce - d, fwd.all_gather, fwd.reduce_scatter)
    elif recompute == "cola-m":
        bwd = bwd + CommVolume(fwd.all_reduce - 2 * d, fwd.all_gather, 0)
    else:
        check_recompute_mode(recompute)
    return fwd, bwd


def block_comm_bytes_per_token(
    args: ModelArgs,
    tp_size: int,
    scheme: str | None = None,
    dtype_bytes: int = 2,
    recompute: str | None = None,
) -> float:
    """Ring bytes each rank sends per token for one block, forward + backward (default bf16, 2 bytes)."""
    fwd, bwd = block_comm_volume(args, scheme, recompute)
    return (fwd + bwd).ring_bytes(tp_size, dtype_bytes)


def model_comm_bytes(
    args: ModelArgs,
    tp_size: int,
    tokens: int,
    dtype_bytes: int = 4,
    recompute: str | None = None,
    scheme: str | None = None,
) -> float:
    """Ring bytes each rank sends for one forward + backward of the whole model on ``tokens`` tokens
    with the loss computed (vocab-parallel embedding, blocks, LM head and cross-entropy); the number a
    ``CommCounter`` around ``model(tokens, labels).backward()`` reports."""
    blocks = args.num_layers * block_comm_bytes_per_token(args, tp_size, scheme, dtype_bytes, recompute)
    embed_and_head = CommVolume(all_reduce=2 * args.hidden_size).ring_bytes(tp_size, dtype_bytes)
    loss = CommVolume(all_reduce=3).ring_bytes(tp_size, 4)  # fp32: max, then (target, sum-exp)
    return tokens * (blocks + embed_and_head + loss)


def comm_table(
    sizes: tuple[str, ...] = ("1B", "7B"),
    tp_sizes: tuple[int, ...] = (2, 4, 8),
    dtype_bytes: int = 2,
    recompute: str = "none",
) -> list[dict[str, float | int | str]]:
    """One row per (size, TP): bytes per token per block of dense, CoLA and naive TP, and CoLA/dense.

    ``recompute="cola-m"`` compares against the dense model with ``full`` recompute (its nearest
    memory-saving mode; CoLA-M needs a CoLA model)."""
    dense_recompute = "full" if recompute == "cola-m" else recompute
    rows: list[dict[str, float | int | str]] = []
    for size in sizes:
        args = ModelArgs.from_size(size)
        for t in tp_sizes:
            dense = block_comm_bytes_per_token(args, t, "dense", dtype_bytes, dense_recompute)
            cola = block_comm_bytes_per_token(args, t, "cola", dtype_bytes, recompute)
            naive = block_comm_bytes_per_token(args, t, "naive", dtype_bytes, recompute)
            rows.append(
                {
                    "size": size,
                    "tp": t,
                    "hidden": args.hidden_size,
                    "rank": args.cola_rank,
                    "dense": dense,
                    "cola": cola,
                    "naive": naive,
                    "ratio": cola / dense,
                    "naive_ratio": naive / dense,
                }
            )
    return rows


def format_comm_table(rows: list[dict[str, float | int | str]]) -> str:
    """Markdown table of ``comm_table`` rows (KiB per token per block)."""
    lines = [
        "| size | TP | dense TP KiB/tok/block | CoLA TP KiB/tok/block | CoLA / dense "
        "| naive rank-split KiB | naive / dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['tp']} | {row['dense'] / 1024:.2f} | {row['cola'] / 1024:.2f} "
            f"| {row['ratio']:.3f} | {row['naive'] / 1024:.2f} | {row['naive_ratio']:.2f} |"
        )
    return "\n".join(lines)


__all__ = [
    "CommVolume",
    "SCHEMES",
    "block_comm_bytes_per_token",
    "block_comm_volume",
    "comm_table",
    "format_comm_table",
    "model_comm_bytes",
]
