"""``torch.compile`` per decoder block (torchtitan's way), and a graph-break report.

Compiling each block, not the whole model, keeps compile time flat in depth and leaves ZeRO's hooks
(and the embedding, head and loss) outside the graphs. ``nn.Module.compile`` compiles in place, so
parameter names, ``state_dict`` keys, checkpoints and the sharding plan are unchanged.

Every recomputation mode compiles the whole block into one graph: ``full``'s checkpoint is traced as a
checkpointed region, which the compiler recomputes in backward; ``cola-m``'s two checkpointed
half-blocks carry their selective-checkpoint policy into the graph (``model.recompute``), so the
partitioner saves the kept A outputs and recomputes everything else, with no A GEMM in backward.

Under tensor parallelism dynamo traces the collectives (autograd functions around ``torch.distributed``
calls, and CoLA-M's kept custom ops) into the block's graph; ``graph_breaks`` reports the count
(docs/performance.md: one graph, no break, per block in every mode at TP=1 and TP=2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_cola.config import COMPILE_MODES
from megatron_cola.model.transformer import CoLALlama, DecoderLayer

# ``COMPILE_MODES`` (config.py) are the modes ``--compile-mode`` offers. ``reduce-overhead`` adds CUDA
# graphs (a caller marks each training step with ``torch.compiler.cudagraph_mark_step_begin``);
# ``default`` is Inductor without CUDA graphs or GEMM autotuning.


def compile_blocks(model: CoLALlama, mode: str | None = None, **compile_kwargs: Any) -> CoLALlama:
    """Compile every decoder block of ``model`` in place with ``torch.compile``'s ``mode`` (one of
    ``COMPILE_MODES``; ``None`` is ``"default"``; other keyword arguments pass through) and return it.
    Works for any recompute mode, with or without tensor parallelism; call it after
    ``apply_tensor_parallel`` and before wrapping for DeepSpeed."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if mode not in (None, "default"):
        compile_kwargs["mode"] = mode
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


__all__ = ["COMPILE_MODES", "GraphBreaks", "compile_blocks", "graph_breaks"]
