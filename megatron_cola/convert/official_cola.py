"""The CoLA authors' checkpoints: their activation semantics and their CoLA-M tensor layout.

The authors' ``ColaConfig`` (``model_type: cola``) serves two models:

``ColaForCausalLM``   a LLaMA whose seven linear maps are ``ColaLayer`` modules of the same names, each
                      holding ``cola_a`` ``[in, rank]`` and ``cola_b`` ``[rank, out]`` (``hf_format`` maps
                      these names and transposes);
``ColaMForCausalLM``  CoLA-M: the same weights split into "pre" modules (``cola_a`` and σ) and "post" modules
                      (``cola_b``), grouped by where the memory-saving recomputation cuts the block, with
                      layer i's down-projection B stored in layer i+1 (``last_layer_post_mlp``) and the last
                      layer's in its own ``post_mlp``.

``colam_to_cola`` renames a CoLA-M state dict to ``ColaForCausalLM``'s names, so one mapping reads both.

Activations: both models apply the config's ``hidden_act`` as σ on every bottleneck *and* (when
``only_lr_act`` is false) to SwiGLU's gate; ``lr_act_type`` is stored in the config but not used by
either model. ``official_activation_fields`` follows that.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron_cola.errors import ConversionError

# ``transformers.activations.ACT2FN`` names whose function equals one of ``config.ACTIVATIONS``.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",  # ACT2FN's GELUActivation: the exact (erf) GELU, torch.nn.functional.gelu
    "relu": "relu",
    "tanh": "tanh",
    "linear": "identity",
}
# Ours -> the ACT2FN name written into exported LLaMA configs.
OUR_TO_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "relu": "relu", "tanh": "tanh", "identity": "linear"}


def hf_activation(name: Any, field: str, where: str) -> str:
    """Our activation for the ``ACT2FN`` name ``name`` read from config field ``field``."""
    if name not in HF_ACTIVATIONS:
        raise ConversionError(
            f"{where}: config field {field}={name!r} is not supported; Megatron-CoLA can represent "
            f"{sorted(HF_ACTIVATIONS)} (other ACT2FN functions, e.g. the tanh-approximated GELUs, differ)"
        )
    return HF_ACTIVATIONS[name]


def official_activation_fields(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``ModelArgs`` activation fields of an authors' config: σ and the gate both come from ``hidden_act``."""
    act = hf_activation(config.get("hidden_act", "silu"), "hidden_act", where)
    gated = not config.get("only_lr_act", True)
    return {"cola_activation": act, "gate_activation": gated, "mlp_gate_act": act if gated else "silu"}


def our_activation_fields_from_llama(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``ModelArgs`` gate fields of a ``LlamaForCausalLM`` config (``hidden_act`` acts on the gate)."""
    act = hf_activation(config.get("hidden_act", "silu"), "hidden_act", where)
    return {"gate_activation": act != "identity", "mlp_gate_act": act if act != "identity" else "silu"}


# ---------------------------------------------------------------------------------------------- CoLA-M
_L = r"model\.layers\.(\d+)\."
# (pattern on a CoLA-M name, ColaForCausalLM module of the same layer). Groups: layer, [proj,] param.
_COLAM_RULES = [
    (re.compile(_L + r"pre_attn\.pre_(q|k|v)_proj\.(cola_a)$"), "self_attn.{}_proj"),
    (re.compile(_L + r"self_attn\.post_(q|k|v)_proj\.(cola_b|bias)$"), "self_attn.{}_proj"),
    (re.compile(_L + r"self_attn\.pre_(o)_proj\.(cola_a)$"), "self_attn.{}_proj"),
    (re.compile(_L + r"post_attn\.post_(o)_proj\.(cola_b|bias)$"), "self_attn.{}_proj"),
    (re.compile(_L + r"pre_mlp\.pre_(gate|up)_proj\.(cola_a)$"), "mlp.{}_proj"),
    (re.compile(_L + r"self_mlp\.post_(gate|up)_proj\.(cola_b|bias)$"), "mlp.{}_proj"),
    (re.compile(_L + r"self_mlp\.pre_(down)_proj\.(cola_a)$"), "mlp.{}_proj"),
]
# The down-projection B: layer i's lives in layer i+1's ``last_layer_post_mlp``; the last layer's in
# its ``post_mlp`` (accepted also at the model level, ``model.post_mlp``).
_SHIFTED_DOWN_B = re.compile(_L + r"last_layer_post_mlp\.post_down_proj\.(cola_b|bias)$")
_LAST_DOWN_B = re.compile(r"model\.(?:layers\.(\d+)\.)?post_mlp\.post_down_proj\.(cola_b|bias)$")
_MARKERS = (".pre_attn.", ".post_attn.", ".pre_mlp.", ".self_mlp.", "post_mlp.post_down_proj.")


def is_colam(names: Any) -> bool:
    """Whether tensor ``names`` are in the authors' CoLA-M layout."""
    return any(marker in name for name in names for marker in _MARKERS)


def _colam_target(name: str, num_layers: int, where: str) -> str | None:
    """The ``ColaForCausalLM`` name of CoLA-M tensor ``name``; ``None`` for a name CoLA-M shares with it."""
    for pattern, module in _COLAM_RULES:
        m = pattern.match(name)
        if m:
            layer, proj, param = m.groups()
            return f"model.layers.{layer}.{module.format(proj)}.{param}"
    m = _SHIFTED_DOWN_B.match(name)
    if m:
        layer, param = int(m.group(1)), m.group(2)
        if not 1 <= layer <= num_layers:
            raise ConversionError(
                f"{where}: tensor {name} would be the down-projection of layer {layer - 1}, but the config "
                f"has num_hidden_layers={num_layers} (layer 0 has no last_layer_post_mlp)"
            )
        return f"model.layers.{layer - 1}.mlp.down_proj.{param}"
    m = _LAST_DOWN_B.match(name)
    if m:
        layer, param = m.groups()
        if layer is not None and int(layer) != num_layers - 1:
            raise ConversionError(
                f"{where}: tensor {name}: only the last layer ({num_layers - 1}) holds a post_mlp"
            )
        return f"model.layers.{num_layers - 1}.mlp.down_proj.{param}"
    return None


def colam_to_cola(tensors: dict[str, torch.Tensor], num_layers: int, where: str) -> dict[str, torch.Tensor]:
    """A CoLA-M state dict under ``ColaForCausalLM``'s names (the shifted down-projections moved back).

    Names CoLA-M shares with ``ColaForCausalLM`` (embeddings, norms, LM head) and names neither model has
    pass unchanged, so the shape check that follows reports them; two tensors landing on one name raise.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, t in tensors.items():
        target = _colam_target(name, num_layers, where) or name
        if target in out:
            raise ConversionError(
                f"{where}: tensors {origin[target]} and {name} both map to {target} in the CoLA-M layout"
            )
        out[target] = t
        origin[target] = name
    return out


__all__ = [
    "HF_ACTIVATIONS",
    "OUR_TO_HF_ACTIVATION",
    "colam_to_cola",
    "hf_activation",
    "is_colam",
    "official_activation_fields",
    "our_activation_fields_from_llama",
]
