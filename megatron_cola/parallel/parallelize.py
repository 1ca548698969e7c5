"""``parallelize``: every way a run changes how the plain model executes, applied in one visible pass.

torchtitan's ``parallelize_llama`` shape: the model file stays plain and TP-agnostic, and this function
applies, in order,

1. tensor parallelism (``apply_tensor_parallel``, the scheme picked by ``effective_scheme``), which also
   swaps the LM head for its vocab-parallel twin, so the loss is owned here, not by the model;
2. activation recomputation (``apply_recompute``: whole-block checkpointing or CoLA-M);
3. ``torch.compile`` per decoder block (``model.compile.compile_blocks``).

DeepSpeed wraps the result afterwards (``training/engine.py``). Every step works on a model built on
the meta device (weights drawn later by ``init_weights``) as on a materialised one.
"""

from __future__ import annotations

from megatron_cola.config import DEFAULT_TP_SCHEME
from megatron_cola.model.compile import compile_blocks
from megatron_cola.model.recompute import check_recompute_mode
from megatron_cola.model.transformer import CoLALlama
from megatron_cola.parallel.state import ParallelState
from megatron_cola.parallel.transform import apply_tensor_parallel, effective_scheme


def apply_recompute(model: CoLALlama, mode: str) -> CoLALlama:
    """Set every block's recomputation ``mode`` (``config.RECOMPUTE_CHOICES``), and whether the CoLA
    layers keep their A outputs (CoLA-M), in place. The bottleneck TP scheme's A projections are always
    its kept op (the GEMM and its all-reduce), so they need no flag."""
    check_recompute_mode(mode)
    for block in model.layers:
        block.recompute = mode
        for module in block.modules():
            if hasattr(module, "keep_a_output"):
                module.keep_a_output = mode == "cola-m"
    return model


def parallelize(
    model: CoLALlama,
    state: ParallelState,
    *,
    scheme: str = DEFAULT_TP_SCHEME,
    compile_mode: str | None = None,
) -> CoLALlama:
    """Apply TP (``scheme``, ``--cola-tp-scheme``), then ``model.args.recompute``, then compile each
    block when ``compile_mode`` is given (``--compile``'s ``--compile-mode``; ``None``: eager). In place;
    returns ``model``."""
    apply_tensor_parallel(model, state, scheme)
    apply_recompute(model, model.args.recompute)
    if compile_mode is not None:
        compile_blocks(model, mode=compile_mode)
    return model


__all__ = ["apply_recompute", "effective_scheme", "parallelize"]
