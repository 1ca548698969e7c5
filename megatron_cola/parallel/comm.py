"""Analytic communication model of tensor parallelism: bytes and collectives per token, block and model.

Counts follow ``megatron_cola.parallel.counter``: the *ring* bytes each rank sends (all-reduce
``2 (t-1)/t · n``, all-gather / reduce-scatter ``(t-1)/t · n``, ``n`` the full tensor's bytes). Schemes,
per token per block (``d`` hidden, ``f`` ffn, ``r`` CoLA rank; fwd + bwd):

``dense``       Megatron on the full-rank model: all-reduce of d after o and down (fwd) and at the
                attention and MLP inputs (bwd): 4 all-reduces of d.
``split-rank``  ours, the default (docs/tensor_parallel.md; ``cola`` is an old name of it): fwd 5
                all-gathers of r (q, k, v, gate, up bottlenecks), 2 reduce-scatters of r (o, down
                bottlenecks), 2 all-reduces of d (o, down outputs); bwd the conjugates: 5 reduce-scatters
                and 2 all-gathers of r, and 2 all-reduces of d at the attention / MLP inputs. Ring bytes:
                ``(t-1)/t · (8 d + 14 r)`` elements vs dense ``(t-1)/t · 8 d``: ratio ``1 + 1.75 r/d``
                (1.4375 at the paper's r = d/4); 18 collectives. Grouping q/k/v and gate/up changes
                neither (the all-gathers stay one per map).
``bottleneck``  BOOST's layout, exact: the residual stream sharded on d, every A row-parallel on the
                local slice and its r-wide partial sums all-reduced (forward), σ on the full r, and the
                conjugate all-reduce of the r-wide gradient at B's input (backward). The A maps that
                read an RMSNorm's output fold the norm's per-token sum of squares into their forward
                all-reduce (one more element each: q, k, v, gate, up; grouped q/k/v and gate/up carry
                one each); its gradient needs no collective (the global RMS is replicated). Per block:
                forward plain 7 all-reduces of ``7 r + 5`` in all, grouped 4 (3r+1, r, 2r+1, r) of
                ``7 r + 2``; backward as many of ``7 r``. Ring bytes ``(t-1)/t · 2 (14 r + 5)`` (grouped
                ``+ 2``): ratio ``(14 r + 5) / 4 d``, 0.8756 at 1B and 0.8753 at 7B (r = d/4).
``naive``       CoLA with every layer split over r alone (A column-, B row-parallel): all-reduce of each
                layer's output (fwd) and input gradient (bwd, shared by q/k/v and by gate/up):
                ``5d + 2f`` + ``3d + f`` all-reduced elements, and attention / SwiGLU replicated on every
                rank.

Activation recomputation re-runs forward collectives in backward (``block_comm_volume`` says which:
``full`` all but the block's closing all-reduce of d, ``cola-m`` only split-rank's 5 all-gathers of r;
under ``bottleneck`` CoLA-M keeps the all-reduced A outputs and re-runs none). Outside the blocks
(``model_comm_bytes``): the vocab-parallel embedding all-reduces d (fwd) and the LM head's input gradient
d (bwd); under ``bottleneck`` the embedding is split on d (no collective) and the final norm all-reduces
its sum of squares (fwd and bwd) before one all-gather of d into the head (reduce-scatter in bwd); the
vocab-parallel loss all-reduces 3 fp32 numbers per token (max; target logit and sum of exponentials).
``CommCounter`` measures the same numbers on a real run (tests/test_comm_bytes.py, tools/comm_bytes.py
``--measure``).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_cola.config import TP_SCHEMES, ModelArgs
from megatron_cola.model.recompute import check_recompute_mode
from megatron_cola.parallel.counter import ring_factor

COLA_TP_SCHEMES = TP_SCHEMES
"""Tensor-parallel schemes of a CoLA model (``--cola-tp-scheme``, ``config.TP_SCHEMES``); full-rank
models use ``dense``."""
SCHEMES = (*COLA_TP_SCHEMES, "dense", "naive")
"""Every scheme the analytic model knows."""
_ALIASES = {"cola": "split-rank"}


def canonical_scheme(scheme: str) -> str:
    """``scheme`` under its current name (``cola`` is ``split-rank``); ``ValueError`` if unknown."""
    scheme = _ALIASES.get(scheme, scheme)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown TP scheme {scheme!r}; allowed: {list(SCHEMES)}")
    return scheme


@dataclass(frozen=True)
class CommVolume:
    """Elements per token of the full tensors each collective kind moves, and how many collectives."""

    all_reduce: int = 0
    all_gather: int = 0
    reduce_scatter: int = 0
    collectives: int = 0

    def __add__(self, other: CommVolume) -> CommVolume:
        return CommVolume(
            self.all_reduce + other.all_reduce,
            self.all_gather + other.all_gather,
            self.reduce_scatter + other.reduce_scatter,
            self.collectives + other.collectives,
        )

    def ring_bytes(self, tp_size: int, elem_bytes: int) -> float:
        """Bytes each rank sends per token under the ring algorithm."""
        return elem_bytes * (
            self.all_reduce * ring_factor("all_reduce", tp_size)
            + self.all_gather * ring_factor("all_gather", tp_size)
            + self.reduce_scatter * ring_factor("reduce_scatter", tp_size)
        )


def _default_scheme(args: ModelArgs) -> str:
    return "dense" if args.full_rank else "split-rank"


def _bottleneck_volume(args: ModelArgs) -> tuple[CommVolume, CommVolume]:
    """A bottleneck block's ``(forward, backward)``: an all-reduce per A output (grouped: per group),
    forward with one more element per all-reduce that carries an RMSNorm's sum of squares."""
    r = args.cola_rank
    if args.grouped_projections:  # [q k v]+ss, o, [gate up]+ss, down
        return CommVolume(all_reduce=7 * r + 2, collectives=4), CommVolume(all_reduce=7 * r, collectives=4)
    return CommVolume(all_reduce=7 * r + 5, collectives=7), CommVolume(all_reduce=7 * r, collectives=7)


def block_comm_volume(
    args: ModelArgs, scheme: str | None = None, recompute: str | None = None
) -> tuple[CommVolume, CommVolume]:
    """``(forward, backward)`` volume of one block, per token; recomputed forwards count in backward.

    ``scheme`` defaults to the model's own (``dense`` for full rank, else ``split-rank``); grouped
    projections are read from ``args``."""
    scheme = canonical_scheme(scheme or _default_scheme(args))
    recompute = args.recompute if recompute is None else recompute
    check_recompute_mode(recompute)
    d, f, r = args.hidden_size, args.ffn_hidden_size, args.cola_rank
    if scheme == "bottleneck":
        fwd, bwd = _bottleneck_volume(args)
        # Full recompute re-runs every forward all-reduce: the last one (down's A) feeds down's B, whose
        # saved input the recomputation must rebuild. CoLA-M keeps the all-reduced A outputs: none.
        return fwd, (bwd + fwd if recompute == "full" else bwd)
    if scheme == "split-rank":
        fwd = CommVolume(all_reduce=2 * d, all_gather=5 * r, reduce_scatter=2 * r, collectives=9)
        bwd = CommVolume(all_reduce=2 * d, all_gather=2 * r, reduce_scatter=5 * r, collectives=9)
        scatters = 2  # o / down: the reduce-scatter is part of the kept A op under CoLA-M
    elif scheme == "dense":
        fwd = CommVolume(all_reduce=2 * d, collectives=2)
        bwd = CommVolume(all_reduce=2 * d, collectives=2)
        scatters = 0
    else:  # naive
        fwd = CommVolume(all_reduce=5 * d + 2 * f, collectives=7)
        bwd = CommVolume(all_reduce=3 * d + f, collectives=4)
        scatters = 0
    # Recomputation re-runs forward collectives in backward. Never the all-reduce of d that closes each
    # checkpointed region: nothing saved inside the region needs its output, and torch's non-reentrant
    # checkpoint stops recomputing once every saved tensor is back (early stop). ``full`` has one region
    # per block; ``cola-m`` one per half-block, and it replays each A projection's kept output, which
    # for o / down already includes the reduce-scatter (one kept op): only the
    # all-gathers of the rank-r activations (and, naive / dense, the all-reduces feeding the attention
    # or SwiGLU) are redone.
    if recompute == "full":
        bwd = bwd + CommVolume(fwd.all_reduce - d, fwd.all_gather, fwd.reduce_scatter, fwd.collectives - 1)
    elif recompute == "cola-m":
        bwd = bwd + CommVolume(fwd.all_reduce - 2 * d, fwd.all_gather, 0, fwd.collectives - 2 - scatters)
    return fwd, bwd


def block_collectives(args: ModelArgs, scheme: str | None = None, recompute: str | None = None) -> int:
    """Collectives one block issues per forward + backward (each a latency, whatever its size)."""
    fwd, bwd = block_comm_volume(args, scheme, recompute)
    return (fwd + bwd).collectives


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


def outside_blocks_volume(args: ModelArgs, scheme: str | None = None) -> tuple[CommVolume, CommVolume]:
    """``(activations, loss)`` volume per token outside the blocks, forward + backward: the embedding,
    the final norm and the LM head's input (activation dtype), and the vocab-parallel loss (fp32)."""
    scheme = canonical_scheme(scheme or _default_scheme(args))
    d = args.hidden_size
    if scheme == "bottleneck":  # final norm's sum of squares (fwd, bwd); all-gather of d (bwd: scatter)
        acts = CommVolume(all_reduce=2, all_gather=d, reduce_scatter=d, collectives=4)
    else:  # vocab-parallel embedding's output (fwd), LM head's input gradient (bwd)
        acts = CommVolume(all_reduce=2 * d, collectives=2)
    loss = CommVolume(all_reduce=3, collectives=2)  # max, then (target logit, sum of exponentials)
    return acts, loss


def model_comm_bytes(
    args: ModelArgs,
    tp_size: int,
    tokens: int,
    dtype_bytes: int = 4,
    recompute: str | None = None,
    scheme: str | None = None,
) -> float:
    """Ring bytes each rank sends for one forward + backward of the whole model on ``tokens`` tokens
    with the loss computed (embedding, blocks, LM head and vocab-parallel cross-entropy); the number a
    ``CommCounter`` around ``model(tokens, labels).backward()`` reports."""
    blocks = args.num_layers * block_comm_bytes_per_token(args, tp_size, scheme, dtype_bytes, recompute)
    acts, loss = outside_blocks_volume(args, scheme)
    return tokens * (blocks + acts.ring_bytes(tp_size, dtype_bytes) + loss.ring_bytes(tp_size, 4))


def model_collectives(args: ModelArgs, scheme: str | None = None, recompute: str | None = None) -> int:
    """Collectives one forward + backward of the whole model issues (any number of tokens)."""
    acts, loss = outside_blocks_volume(args, scheme)
    return args.num_layers * block_collectives(args, scheme, recompute) + acts.collectives + loss.collectives


def comm_table(
    sizes: tuple[str, ...] = ("1B", "7B"),
    tp_sizes: tuple[int, ...] = (2, 4, 8),
    dtype_bytes: int = 2,
    recompute: str = "none",
    schemes: tuple[str, ...] = COLA_TP_SCHEMES,
    grouped_projections: bool = False,
) -> list[dict[str, float | int | str | bool]]:
    """One row per (size, TP, scheme): bytes per token per block and collectives per block of the CoLA
    scheme and of dense TP on the full-rank model of the same size, and their ratio.

    ``recompute="cola-m"`` compares against the dense model with ``full`` recompute (its nearest
    memory-saving mode; CoLA-M needs a CoLA model)."""
    dense_recompute = "full" if recompute == "cola-m" else recompute
    rows: list[dict[str, float | int | str | bool]] = []
    for size in sizes:
        args = ModelArgs.from_size(size, grouped_projections=grouped_projections)
        for t in tp_sizes:
            dense = block_comm_bytes_per_token(args, t, "dense", dtype_bytes, dense_recompute)
            for scheme in schemes:
                scheme = canonical_scheme(scheme)
                cola = block_comm_bytes_per_token(args, t, scheme, dtype_bytes, recompute)
                rows.append(
                    {
                        "size": size,
                        "tp": t,
                        "scheme": scheme,
                        "grouped_projections": grouped_projections,
                        "recompute": recompute,
                        "dtype_bytes": dtype_bytes,
                        "hidden": args.hidden_size,
                        "rank": args.cola_rank,
                        "cola_bytes": cola,
                        "dense_bytes": dense,
                        "ratio": cola / dense,
                        "collectives": block_collectives(args, scheme, recompute),
                        "dense_collectives": block_collectives(args, "dense", dense_recompute),
                    }
                )
    return rows


def format_comm_table(rows: list[dict[str, float | int | str | bool]]) -> str:
    """Markdown table of ``comm_table`` rows (KiB per token per block, collectives per block)."""
    lines = [
        "| size | TP | scheme | dense TP KiB/tok/block | CoLA TP KiB/tok/block | CoLA / dense "
        "| collectives/block (dense) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['tp']} | {row['scheme']} | {row['dense_bytes'] / 1024:.2f} "
            f"| {row['cola_bytes'] / 1024:.2f} | {row['ratio']:.3f} "
            f"| {row['collectives']} ({row['dense_collectives']}) |"
        )
    return "\n".join(lines)


__all__ = [
    "COLA_TP_SCHEMES",
    "CommVolume",
    "SCHEMES",
    "block_collectives",
    "block_comm_bytes_per_token",
    "block_comm_volume",
    "canonical_scheme",
    "comm_table",
    "format_comm_table",
    "model_collectives",
    "model_comm_bytes",
    "outside_blocks_volume",
]
