"""Measure the activation memory a decoder layer keeps for backward.

Runs one ``DecoderLayer`` of the real shapes on a short sequence and counts every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``) plus the tensors CoLA-M's checkpoint cache keeps (the
outputs its selective-checkpoint policy saves, ``record_kept_tensors``). Tensors sharing a storage are
counted once, parameters and the RoPE tables not at all. The result is per token, so it does not depend
on the sequence used to measure it (attention's per-head statistics aside).

``compiled=True`` measures the block as ``compile_blocks`` runs it: the compiled graph saves its
tensors through autograd as well (the partitioner's choice, which CoLA-M's policy steers); the CPU RNG
state a compiled checkpoint saves (a few KiB per block, not per token) is left out.

``saved_activations_of(model, tokens)`` counts the same for the decoder layers of a whole model as it
runs, plain or tensor-parallel (then per rank: this rank's shard). ``cola_m_kept_per_rank`` is what
CoLA-M keeps per rank under each tensor-parallel scheme, analytically.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from megatron_cola.config import ModelArgs
from megatron_cola.model.layers import rope_cos_sin
from megatron_cola.model.recompute import record_kept_tensors
from megatron_cola.model.transformer import CoLALlama, DecoderLayer


@dataclass
class SavedActivations:
    elements_per_token: float
    bytes_per_token: float
    num_tensors: int


def measure_saved_activations(
    args: ModelArgs,
    recompute: str,
    seq_length: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    compiled: bool = False,
) -> SavedActivations:
    """Elements and bytes one layer keeps for backward per token, with recomputation ``recompute``
    (eager, or compiled by ``torch.compile`` when ``compiled``)."""
    args = args.replace(recompute=recompute)
    with torch.device("meta"):
        layer = DecoderLayer(args)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    layer.to(dtype)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    cos, sin = rope_cos_sin(seq_length, args.head_dim, args.rope_theta, torch.device("cpu"), dtype)
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    x = torch.randn(1, seq_length, args.hidden_size, dtype=dtype, requires_grad=True)
    if compiled:
        layer.compile()
        layer(x, cos, sin).sum().backward()  # compile outside the measurement
    rng_state_bytes = torch.get_rng_state().numel()

    storages: dict[int, tuple[int, int]] = {}

    def note(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if compiled and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == rng_state_bytes:
            return  # the compiled checkpoint's copy of the RNG state
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = (st.nbytes() // t.element_size(), st.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t)
        return t

    with record_kept_tensors() as kept, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, cos, sin)
    for t in kept:
        note(t)
    del out
    elements = sum(e for e, _ in storages.values())
    nbytes = sum(b for _, b in storages.values())
    return SavedActivations(elements / seq_length, nbytes / seq_length, len(storages))


def saved_activations_of(
    model: CoLALlama, tokens: torch.Tensor, labels: torch.Tensor | None = None
) -> SavedActivations:
    """Per token and per decoder layer, what ``model``'s layers keep for backward in one forward of
    ``tokens`` (with the loss when ``labels`` are given), on this rank.

    The model may be tensor-parallel (any scheme): the count is then this rank's. Counted as in
    ``measure_saved_activations``: every tensor autograd saves while a decoder layer runs, plus what
    CoLA-M's checkpoint cache keeps, one count per storage, parameters and the RoPE tables left out. Each
    layer's input counts in that layer; the embedding, final norm, head and loss are not counted."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            storages[st.data_ptr()] = (st.nbytes() // t.element_size(), st.nbytes())
        return t

    stack = contextlib.ExitStack()

    def enter(module: torch.nn.Module, args: object) -> None:
        for cos_sin in model._rope_cache.values():  # filled by now: the layers' RoPE tables
            skip.update(t.untyped_storage().data_ptr() for t in cos_sin)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))

    def leave(module: torch.nn.Module, args: object, output: object) -> None:
        stack.close()

    handles = [
        h
        for layer in model.layers
        for h in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))
    ]
    try:
        with record_kept_tensors() as kept:
            out = model(tokens, labels) if labels is not None else model(tokens)
    finally:
        stack.close()
        for h in handles:
            h.remove()
    for t in kept:
        pack(t)
    del out
    per = tokens.numel() * model.args.num_layers
    elements = sum(e for e, _ in storages.values())
    nbytes = sum(b for _, b in storages.values())
    return SavedActivations(elements / per, nbytes / per, len(storages))


def cola_m_kept_per_rank(args: ModelArgs, tp_size: int, scheme: str = "split-rank") -> float:
    """Elements per token per layer CoLA-M keeps on each rank under a tensor-parallel ``scheme``.

    The residual entering each half-block (2 tensors of d) and the seven A outputs (rank r). Split-rank
    replicates the residual and shards the A outputs: ``2 d + 7 r/t``. Bottleneck shards the residual on
    d and keeps the all-reduced A outputs whole, so its recomputation needs no collective: ``2 d/t + 7 r``,
    plus the RMSNorm sum of squares each kept all-reduce of q, k, v, gate and up carries (5 elements; 2
    when q/k/v and gate/up are grouped). Grouping keeps the same A elements in fewer tensors."""
    if args.full_rank:
        raise ValueError("CoLA-M needs a CoLA model (full_rank=False)")
    d, r, t = args.hidden_size, args.cola_rank, tp_size
    if scheme in ("split-rank", "cola"):  # cola: split-rank's old name
        return 2 * d + 7 * r / t
    if scheme == "bottleneck":
        return 2 * d / t + 7 * r + (2 if args.grouped_projections else 5)
    raise ValueError(f"CoLA-M under TP scheme {scheme!r} is not modelled; use split-rank or bottleneck")
