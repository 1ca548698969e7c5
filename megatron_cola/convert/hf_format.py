"""Name, shape and config mapping between Megatron-CoLA checkpoints and Hugging Face folders.

Four weight layouts are understood:

``llama``          a native ``LlamaForCausalLM`` (our full-rank models): ``model.`` + our name, same shapes
                   (``lm_head.weight`` keeps its name);
``megatron_cola``  our exported ``ColaForCausalLM``: the same renaming, ``weight_a`` ``(rank, in)`` and
                   ``weight_b`` ``(out, rank)`` unchanged;
``official_cola``  the CoLA authors' ``ColaForCausalLM`` (a ``LlamaForCausalLM`` whose seven linear maps
                   are ``ColaLayer`` modules computing ``σ(x @ cola_a) @ cola_b``): ``cola_a`` ``[in, rank]``
                   is our ``weight_a`` transposed, ``cola_b`` ``[rank, out]`` our ``weight_b`` transposed;
                   its config names the rank ``rank``; ``hidden_act`` is σ and, unless ``only_lr_act``
                   (True: ``down(gate * up)``, our ``gate_activation=False``), the gate activation too
                   (``lr_act_type`` is ignored, as the authors' model ignores it);
``official_colam`` the authors' CoLA-M ``ColaMForCausalLM``: the same tensors under other module names,
                   renamed by ``official_cola.colam_to_cola`` and then read as ``official_cola``.

Also here: the safetensors writer (sharded with an index past a size limit) and reader (single file,
sharded with an index, or ``pytorch_model*.bin``), and the validation that names every missing,
unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

import torch

from megatron_cola.config import ModelArgs
from megatron_cola.convert.official_cola import (
    OUR_TO_HF_ACTIVATION,
    official_activation_fields,
    our_activation_fields_from_llama,
)
from megatron_cola.errors import ConversionError
from megatron_cola.model.transformer import CoLALlama

LAYOUTS = ("llama", "megatron_cola", "official_cola", "official_colam")
COLA_MODEL_TYPE = "megatron_cola"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Tensors some HF LLaMA checkpoints carry that hold no weights.
#: ``--dtype`` names of the converters and ``tools/generate.py`` (one table for export, import, inference).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------- names
def hf_name(name: str) -> str:
    """Our parameter name -> its ``LlamaForCausalLM`` / ``ColaForCausalLM`` name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def source_name(name: str, layout: str) -> str:
    """The name of our parameter ``name`` in a folder of ``layout``."""
    out = hf_name(name)
    if layout == "official_cola":
        out = re.sub(r"\.weight_a$", ".cola_a", out)
        out = re.sub(r"\.weight_b$", ".cola_b", out)
    return out


def _transposed(name: str, layout: str) -> bool:
    return layout == "official_cola" and name.endswith((".weight_a", ".weight_b"))


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``args`` (from a model built on the meta device)."""
    with torch.device("meta"):
        model = CoLALlama(args.replace(recompute="none"))
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- validation
def _fmt(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensors(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Raise ``ConversionError`` listing every missing, mis-shaped and unexpected tensor of ``found``."""
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"missing tensor {name} (expected shape {_fmt(shape)})")
        elif tuple(found[name]) != tuple(shape):
            problems.append(f"tensor {name} has shape {_fmt(found[name])}, expected {_fmt(shape)}")
    for name in sorted(set(found) - set(expected)):
        problems.append(f"unexpected tensor {name} with shape {_fmt(found[name])}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ConversionError(f"{where}: " + "; ".join(shown))


def to_layout(state: dict[str, torch.Tensor], args: ModelArgs, layout: str) -> dict[str, torch.Tensor]:
    """Our (unsharded, unpadded) state dict -> the tensors of a folder of ``layout``, validated."""
    expected = expected_shapes(args)
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, expected, "checkpoint")
    out = {}
    for name in expected:
        t = state[name]
        out[source_name(name, layout)] = t.t().contiguous() if _transposed(name, layout) else t
    return out


def from_layout(
    tensors: dict[str, torch.Tensor], args: ModelArgs, layout: str, where: str
) -> dict[str, torch.Tensor]:
    """The tensors of a folder of ``layout`` -> our state dict, after checking every name and shape."""
    expected = expected_shapes(args)
    wanted = {}
    for name, shape in expected.items():
        wanted[source_name(name, layout)] = shape[::-1] if _transposed(name, layout) else shape
    found = {k: tuple(v.shape) for k, v in tensors.items() if not IGNORED_HF_TENSORS.fullmatch(k)}
    check_tensors(found, wanted, where)
    out = {}
    for name in expected:
        t = tensors[source_name(name, layout)]
        out[name] = t.t().contiguous() if _transposed(name, layout) else t
    return out


# ---------------------------------------------------------------------------------------------- configs
def hf_config_dict(args: ModelArgs, token_ids: dict[str, int | None], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` fields of the export of ``args``: ``LlamaConfig`` fields for full rank,
    ``ColaConfig`` fields (and ``auto_map``) for CoLA."""
    common = {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_length,
        "initializer_range": args.init_std,
        "tie_word_embeddings": False,
        "bos_token_id": token_ids.get("bos"),
        "eos_token_id": token_ids.get("eos"),
        "pad_token_id": token_ids.get("pad"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.full_rank:
        return {
            **common,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "num_key_value_heads": args.num_attention_heads,
            "head_dim": args.head_dim,
            # LLaMA applies ``hidden_act`` to the gate: "linear" is the identity of gate_activation=False.
            "hidden_act": OUR_TO_HF_ACTIVATION[args.mlp_gate_act] if args.gate_activation else "linear",
            "attention_bias": False,
            "mlp_bias": False,
        }
    return {
        **common,
        "model_type": COLA_MODEL_TYPE,
        "architectures": ["ColaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_cola.ColaConfig",
            "AutoModelForCausalLM": "modeling_cola.ColaForCausalLM",
        },
        "cola_rank": args.cola_rank,
        "cola_activation": args.cola_activation,
        "gate_activation": args.gate_activation,
        "mlp_gate_act": args.mlp_gate_act,
    }


def detect_layout(config: dict[str, Any], where: str) -> str:
    """Which of ``LAYOUTS`` a ``config.json`` describes."""
    model_type = config.get("model_type")
    if model_type == COLA_MODEL_TYPE:
        return "megatron_cola"
    if model_type == "cola" or ("rank" in config and "only_lr_act" in config):
        return "official_cola"
    if model_type == "llama" or "LlamaForCausalLM" in (config.get("architectures") or []):
        return "llama"
    raise ConversionError(
        f"{where}: model_type {model_type!r} is not supported; expected 'llama' (full rank), "
        f"'{COLA_MODEL_TYPE}' (a Megatron-CoLA export) or 'cola' (the CoLA authors' ColaForCausalLM)"
    )


def _rope_theta(config: dict[str, Any], where: str) -> float:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for params in (rope, scaling):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ConversionError(f"{where}: RoPE type {kind!r} is not supported (only the default RoPE)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_args_from_config(config: dict[str, Any], layout: str, where: str) -> ModelArgs:
    """``ModelArgs`` of the model a ``config.json`` of ``layout`` describes; unsupported options raise."""
    get = config.get
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    if get("num_key_value_heads") not in (None, heads):
        raise ConversionError(
            f"{where}: num_key_value_heads={get('num_key_value_heads')} != num_attention_heads={heads}: "
            "grouped-query attention is not supported by Megatron-CoLA models"
        )
    if get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{where}: head_dim={get('head_dim')} != hidden_size / num_attention_heads")
    for flag in ("attention_bias", "mlp_bias"):
        if get(flag):
            raise ConversionError(
                f"{where}: {flag}=True is not supported (Megatron-CoLA models have no biases)"
            )
    fields: dict[str, Any] = dict(
        hidden_size=hidden,
        ffn_hidden_size=get("intermediate_size"),
        num_attention_heads=heads,
        num_layers=get("num_hidden_layers"),
        vocab_size=get("vocab_size"),
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(config, where),
        max_seq_length=int(get("max_position_embeddings", 256)),
        init_std=float(get("initializer_range", 0.02)),
    )
    if layout == "llama":
        fields.update(full_rank=True, **our_activation_fields_from_llama(config, where))
    elif layout == "megatron_cola":
        fields.update(
            cola_rank=get("cola_rank"),
            cola_activation=get("cola_activation", "silu"),
            gate_activation=bool(get("gate_activation", True)),
            mlp_gate_act=get("mlp_gate_act", "silu"),  # exports made before the field: SiLU
        )
    else:  # official_cola, official_colam
        rank = get("rank") if get("rank") is not None else hidden // 4  # the authors' default
        fields.update(cola_rank=rank, **official_activation_fields(config, where))
    try:
        return ModelArgs(**fields)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{where}: {err}") from err


# ---------------------------------------------------------------------------------------------- weights IO
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: str | int) -> int:
    """``"2GB"`` -> 2e9 bytes (GB = 10^9 as in ``transformers``, GiB = 2^30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", size)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ConversionError(f"cannot read size {size!r} (--max-shard-size); write e.g. 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def save_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: str, max_shard_size: str | int = "2GB"
) -> list[str]:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when the total exceeds ``max_shard_size``. Returns the file names."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SAFE_WEIGHTS), metadata={"format": "pt"})
        return [SAFE_WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return [*names, SAFE_INDEX]


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ConversionError(
                f"cannot read {path}: {e}; the file is truncated or corrupted (download it again)"
            ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:
        raise ConversionError(
            f"cannot read {path}: {str(e).splitlines()[0]}; the file is truncated or corrupted"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return dict(obj)


def load_hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF model folder (safetensors preferred, then ``pytorch_model*.bin``).

    With an index, every shard it names must be present: a missing one raises ``ConversionError``
    naming the tensors it should hold; a tensor in the index but in none of the shards raises too.
    """
    for weights, index in ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX)):
        index_path = os.path.join(folder, index)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, []).append(name)
            missing = [fname for fname in by_file if not os.path.exists(os.path.join(folder, fname))]
            if missing:
                fname = missing[0]
                names = sorted(by_file[fname])
                listed = ", ".join(names[:5]) + (f", ... ({len(names)} tensors)" if len(names) > 5 else "")
                raise ConversionError(
                    f"{folder}: shard {fname} named by {index} is missing; it holds {listed}"
                    + (f" (and {len(missing) - 1} more shards are missing)" if len(missing) > 1 else "")
                )
            tensors: dict[str, torch.Tensor] = {}
            for fname, names in by_file.items():
                loaded = _read_file(os.path.join(folder, fname))
                absent = [n for n in names if n not in loaded]
                if absent:
                    raise ConversionError(
                        f"{folder}: tensor {absent[0]} is listed in {index} but not in {fname}"
                    )
                tensors.update(loaded)
            return tensors
        path = os.path.join(folder, weights)
        if os.path.exists(path):
            return _read_file(path)
    raise ConversionError(
        f"{folder} holds no weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder} has no config.json (not a Hugging Face model folder?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); download the model folder again") from e
