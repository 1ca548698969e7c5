"""Export a Megatron-CoLA checkpoint as a Hugging Face ``transformers`` folder.

``export_checkpoint(load_dir, save_dir)`` reads the model files of a checkpoint (any ZeRO stage, any TP
degree: ``load_full_state_dict`` merges the shards and drops the vocab padding) and writes

- full-rank models: a native ``LlamaForCausalLM`` folder (``config.json``, safetensors weights);
- CoLA models: a ``ColaForCausalLM`` folder with ``configuration_cola.py`` and ``modeling_cola.py`` copied
  in and registered through ``auto_map`` (load with ``trust_remote_code=True``; no Megatron-CoLA needed);
- the tokenizer files and ``generation_config.json`` (EOS = the end-of-document token).

Everything is written to a temporary sibling directory that is renamed into place once complete.
``build_hf_model`` makes the same model in memory (``tools/generate.py`` samples from checkpoints with it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from typing import Any

import torch

from megatron_cola.checkpoint import CheckpointReader, load_full_state_dict, resolve_checkpoint_dir
from megatron_cola.checkpoint.optim_state import has_optim_files
from megatron_cola.config import ModelArgs
from megatron_cola.convert.hf_format import DTYPES, hf_config_dict, save_safetensors, to_layout
from megatron_cola.convert.tokenizer import TokenizerSpec, save_tokenizer, special_token_ids
from megatron_cola.errors import ConversionError, MegatronColaError

REMOTE_CODE_FILES = ("configuration_cola.py", "modeling_cola.py")
_HERE = os.path.dirname(os.path.abspath(__file__))


def make_hf_config(args: ModelArgs, token_ids: dict[str, int | None], dtype: torch.dtype) -> Any:
    """The ``transformers`` config object of the export of ``args`` (``LlamaConfig`` or ``ColaConfig``),
    serialised by the installed ``transformers`` in its own current format."""
    fields = hf_config_dict(args, token_ids, dtype)
    model_type = fields.pop("model_type")
    architectures = fields.pop("architectures")
    auto_map = fields.pop("auto_map", None)
    if model_type == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(**fields)
    else:
        from megatron_cola.convert.configuration_cola import ColaConfig

        config = ColaConfig(**fields)
        config.auto_map = auto_map
    config.architectures = architectures
    return config


def hf_state_dict(
    state: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Our state dict -> ``LlamaForCausalLM``/``ColaForCausalLM`` names, cast to ``dtype``, validated."""
    layout = "llama" if args.full_rank else "megatron_cola"
    return {k: v.to(dtype).contiguous() for k, v in to_layout(state, args, layout).items()}


def build_hf_model(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    token_ids: dict[str, int | None] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """The exported model, in memory (eval mode): ``LlamaForCausalLM`` or ``ColaForCausalLM``."""
    config = make_hf_config(args, token_ids or {}, dtype)
    if args.full_rank:
        from transformers import LlamaForCausalLM as model_cls
    else:
        from megatron_cola.convert.modeling_cola import ColaForCausalLM as model_cls
    tensors = hf_state_dict(state, args, dtype)
    model = model_cls.from_pretrained(None, config=config, state_dict=tensors, **dtype_kwarg(dtype))
    return model.eval()


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 5 on, ``torch_dtype`` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def write_hf_folder(
    state: dict[str, torch.Tensor],
    args: ModelArgs,
    save_dir: str,
    *,
    tokenizer: TokenizerSpec | None = None,
    eod: int | None = None,
    dtype: str = "bf16",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> str:
    """Write the HF folder of an unsharded, unpadded state dict of ``args``; returns ``save_dir``."""
    from transformers import GenerationConfig

    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is unknown; allowed: {list(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    save_dir = os.path.abspath(save_dir)
    _check_target(save_dir, overwrite)
    tensors = hf_state_dict(state, args, torch_dtype)  # validates before anything is written
    token_ids: dict[str, int | None] = {}
    if tokenizer is not None:
        tokenizer.check_exists()
        token_ids = special_token_ids(tokenizer, eod)
    elif eod is not None:
        token_ids = {"eos": eod}

    tmp = f"{save_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        make_hf_config(args, token_ids, torch_dtype).save_pretrained(tmp)
        save_safetensors(tensors, tmp, max_shard_size)
        if not args.full_rank:
            for fname in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(_HERE, fname), os.path.join(tmp, fname))
        gen = {k: token_ids.get(k) for k in ("bos", "eos")}
        pad = token_ids.get("pad") if token_ids.get("pad") is not None else token_ids.get("eos")
        GenerationConfig(bos_token_id=gen["bos"], eos_token_id=gen["eos"], pad_token_id=pad).save_pretrained(
            tmp
        )
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        _move_into_place(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir


SOURCES = ("auto", "master", "module")


def weights_source(load_dir: str, iteration: int | None = None, source: str = "auto") -> str:
    """Where an export takes its weights from: ``"master"`` (the fp32 master weights of ``optim_tpNN.pt``)
    or ``"module"`` (the model files: the module's weights, bf16 in a bf16 run). ``"auto"``: the masters
    when the checkpoint holds them."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is unknown; allowed: {list(SOURCES)}")
    if source == "module":
        return source
    has_masters = has_optim_files(CheckpointReader(load_dir, iteration))
    if source == "master" and not has_masters:
        raise ConversionError(
            f"{resolve_checkpoint_dir(load_dir, iteration)} holds no fp32 master weights (optim_tpNN.pt: it "
            "was saved with --no-save-reshardable-optim or by an older version); export with --from-module"
        )
    return "master" if has_masters else "module"


def export_checkpoint(
    load_dir: str,
    save_dir: str,
    iteration: int | None = None,
    *,
    dtype: str = "bf16",
    max_shard_size: str | int = "2GB",
    tokenizer_model: str | None = None,
    with_tokenizer: bool = True,
    overwrite: bool = False,
    source: str = "auto",
) -> str:
    """Export checkpoint ``load_dir`` (its ``latest``, or ``iteration``) to the HF folder ``save_dir``.

    ``source`` (``weights_source``): the fp32 master weights (``"master"``; by default when the checkpoint
    holds them) or the module's weights (``"module"``; bf16-rounded in a bf16 run).

    ``tokenizer_model`` replaces the tokenizer the checkpoint records (a SentencePiece ``.model`` or an HF
    tokenizer folder); ``with_tokenizer=False`` writes no tokenizer.
    """
    _check_not_inside(load_dir, save_dir, iteration)
    used = weights_source(load_dir, iteration, source)
    state, meta = load_full_state_dict(load_dir, iteration, drop_vocab_padding=True, source=used)
    args = ModelArgs.from_dict(meta["args"])
    info = meta.get("tokenizer") or None
    spec = TokenizerSpec.from_info(info, tokenizer_model) if with_tokenizer else None
    if with_tokenizer and spec is None:
        warnings.warn(
            f"{load_dir} records no tokenizer: the export has none (pass --tokenizer-model to add one)",
            stacklevel=2,
        )
    eod = info.get("eod") if isinstance(info, dict) and not tokenizer_model else None
    return write_hf_folder(
        state,
        args,
        save_dir,
        tokenizer=spec,
        eod=eod,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_not_inside(load_dir: str, save_dir: str, iteration: int | None) -> None:
    """Refuse a ``save_dir`` that is, or contains, the checkpoint being read: replacing it would delete
    the training checkpoint."""
    reading = [load_dir]
    with contextlib.suppress(MegatronColaError):
        reading.append(resolve_checkpoint_dir(load_dir, iteration))
    if any(_inside(r, save_dir) for r in reading):
        raise ConversionError(
            f"--save {save_dir} is, or contains, the checkpoint being read (--load {load_dir}); writing the "
            "export there would replace the training checkpoint: choose a --save outside it"
        )


def is_hf_export(folder: str) -> bool:
    """Whether ``folder`` looks like a Hugging Face model folder (``config.json`` and safetensors
    weights) and holds no training checkpoint (``latest``, ``iter_*``)."""
    names = set(os.listdir(folder))
    weights = any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    training = "latest" in names or any(n.startswith("iter_") for n in names)
    return "config.json" in names and weights and not training


def _check_target(save_dir: str, overwrite: bool) -> None:
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ConversionError(f"{save_dir} exists and is not a directory: choose another --save")
    if os.path.isdir(save_dir) and os.listdir(save_dir):
        if not overwrite:
            raise ConversionError(f"{save_dir} exists and is not empty; pass --overwrite to replace it")
        if not is_hf_export(save_dir):
            raise ConversionError(
                f"--overwrite replaces only a Hugging Face export (config.json and *.safetensors), and "
                f"{save_dir} is not one: choose another --save, or remove it yourself"
            )


def _move_into_place(tmp: str, save_dir: str) -> None:
    """Rename the finished ``tmp`` to ``save_dir``; an existing ``save_dir`` is replaced only afterwards."""
    old = None
    if os.path.exists(save_dir):
        old = f"{save_dir}.old-{os.getpid()}"
        os.replace(save_dir, old)
    os.replace(tmp, save_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
