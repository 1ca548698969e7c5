"""Measure the activation memory a decoder layer keeps for backward.

Runs one ``DecoderLayer`` of the real shapes on a short sequence and counts every tensor autograd saves
(``torch.autograd.graph.saved_tensors_hooks``) plus the tensors CoLA-M's checkpoint cache keeps (the
outputs its selective-checkpoint policy saves, ``record_kept_tensors``). Tensors sharing a storage are
counted once, parameters and the RoPE tables not at all. The result is per token, so it does not depend
on the sequence used to measure it (attention's per-head statistics aside).

``compiled=True`` measures the block as ``compile_blocks`` runs it: the compiled graph saves its
tensors through autograd as well (the partitioner's choice, which CoLA-M's policy steers); the CPU RNG
state a compiled checkpoint saves (a few KiB per block, not per token) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_cola.config import ModelArgs
from megatron_cola.model.layers import rope_cos_sin
from megatron_cola.model.recompute import record_kept_tensors
from megatron_cola.model.transformer import DecoderLayer


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
