"""``torch.compile`` per decoder block (torchtitan's way), and a graph-break report.

Compiling each block, not the whole model, keeps compile time flat in depth and leaves ZeRO's hooks
(and the embedding, head and loss) outside the graphs. ``nn.Module.compile`` compiles in place, so
parameter names, ``state_dict`` keys, checkpoints and the sharding plan are unchanged.

Every recomputation mode compiles the whole block into one graph: ``full``'s checkpoint is traced as a
checkpointed region, which the compiler recomputes in backward; ``cola-m``'s two checkpointed
half-blocks carry their selective-checkpoint policy into the graph (``model.recompute``), so the
partitioner saves the kept A outputs and recomputes everything else, with no A GEMM in backward.

Under tensor parallelism the collectives (autograd functions around ``torch.distributed`` calls) are
graph breaks; ``graph_breaks`` reports how many there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_cola.model.transformer import CoLALlama, DecoderLayer


def compile_blocks(model: CoLALlama, **compile_kwargs: Any) -> CoLALlama:
    """Compile every decoder block of ``model`` in place (``torch.compile`` keyword arguments pass
    through, e.g. ``mode="max-autotune"``) and return it. Works for any recompute mode, with or without
    tensor parallelism; call it after ``apply_tensor_parallel`` and before wrapping for DeepSpeed."""
    for layer in model.layers:
        layer.compile(**compile_kwargs)
    return model


@dataclass
class GraphBreaks:
    graphs: int
    breaks: int
    reasons: list[str]


def graph_breaks(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> GraphBreaks:
    """Graphs and graph breaks dynamo makes of one block's forward (``torch._dynamo.explain``), the
    module ``compile_blocks`` compiles."""
    out = torch._dynamo.explain(layer)(x, cos, sin)
    reasons = [str(r.reason).splitlines()[0] for r in out.break_reasons]
    return GraphBreaks(out.graph_count, out.graph_break_count, reasons)


__all__ = ["GraphBreaks", "compile_blocks", "graph_breaks"]
