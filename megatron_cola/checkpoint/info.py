"""What a checkpoint holds and what it can be resumed on (``tools/checkpoint_info.py``).

``checkpoint_info(path)`` takes a ``--save`` directory (the checkpoint ``latest`` names) or one
``iter_*`` directory and returns a JSON-ready dict: the layout it was written with (TP size and scheme,
data-parallel size, ZeRO stage, dtype), iteration, consumed samples, size on disk, the manifest's verdict
and ``resumable_layouts``: the layouts a run may resume it on. Nothing is unpickled that a safe load
(``weights_only=True``) refuses unless the manifest verified the file first, as on resume.
"""

from __future__ import annotations

import os
import re
from typing import Any

from megatron_cola.checkpoint.io import safe_torch_load, tag_iteration
from megatron_cola.checkpoint.layout import LATEST_FILE, read_latest
from megatron_cola.checkpoint.manifest import ALGORITHM, MANIFEST_FILE, read_manifest, verify_checkpoint
from megatron_cola.errors import CheckpointError

#: Per-parameter optimizer files, written in a layout-free form (one per TP rank of the writer).
PER_PARAMETER_OPTIM = re.compile(r"optim_tp\d+\.pt$")
_ENGINE_FILE = re.compile(r"(zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_ZERO_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_FILE = re.compile(r"model_tp(\d+)\.pt$")


def _looks_like_checkpoint(path: str) -> bool:
    names = os.listdir(path)
    return MANIFEST_FILE in names or any(_ENGINE_FILE.search(n) or _MODEL_FILE.match(n) for n in names)


def resolve(path: str) -> tuple[str, str, str | None]:
    """``(root, checkpoint dir, note)`` for a ``--save`` directory (the checkpoint ``latest`` names; the
    newest ``iter_*`` with a note when ``latest`` is missing) or a single checkpoint directory.
    ``CheckpointError`` when ``path`` is neither."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    tag = read_latest(path)
    if tag is not None:
        if not os.path.isdir(os.path.join(path, tag)):
            raise CheckpointError(f"{path}/{LATEST_FILE} names {tag}, which does not exist")
        return path, os.path.join(path, tag), f"the one {LATEST_FILE} names"
    tags = [
        t for t in os.listdir(path) if tag_iteration(t) is not None and os.path.isdir(os.path.join(path, t))
    ]
    if tags:
        newest = max(tags, key=lambda t: tag_iteration(t) or 0)
        return path, os.path.join(path, newest), f"the newest; {path} has no {LATEST_FILE} file"
    if _looks_like_checkpoint(path):
        return os.path.dirname(os.path.abspath(path)), path, None
    raise CheckpointError(
        f"{path} is neither a checkpoint directory (iter_*) nor a --save directory holding one"
    )


def _files(ckpt_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(ckpt_dir):
        out += [os.path.relpath(os.path.join(root, n), ckpt_dir) for n in names]
    return sorted(out)


def _manifest_status(ckpt_dir: str, verify: bool) -> dict[str, Any]:
    try:
        doc = read_manifest(ckpt_dir)
    except CheckpointError as e:
        return {"status": "unreadable", "problems": [str(e)]}
    if doc is None:
        why = "its save did not finish, or it predates manifests"
        return {"status": "missing", "problems": [f"{ckpt_dir} has no {MANIFEST_FILE} ({why})"]}
    out: dict[str, Any] = {"kind": doc.get("kind", "training"), "files": len(doc["files"])}
    if not verify:
        return {**out, "status": "not verified (--no-verify)", "problems": []}
    problems = verify_checkpoint(ckpt_dir)
    return {**out, "status": "verified" if not problems else "failed", "problems": problems}


def _client_state(path: str, verified: bool) -> tuple[dict[str, Any] | None, str]:
    """DeepSpeed's file with the client state: a safe load first (it usually passes), a full one only
    when the manifest verified the file. ``(state or None, note)``."""
    try:
        return safe_torch_load(path, mmap=True), ""
    except CheckpointError:
        if not verified:
            name = os.path.basename(path)
            return None, f"{name} holds Python objects and was not verified: its client state was not read"
    return safe_torch_load(path, mmap=True, trusted=True), ""


def _model_file_meta(path: str) -> tuple[dict[str, Any], str | None]:
    """The metadata of a model file and the dtype of its first tensor (safe, memory-mapped load)."""
    doc = safe_torch_load(path, mmap=True)
    tensors = [t for t in doc.get("state_dict", {}).values() if hasattr(t, "dtype")]
    dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else None
    return {k: v for k, v in doc.items() if k != "state_dict"}, dtype


def _layout_from_files(files: list[str]) -> dict[str, Any]:
    """TP size, ZeRO stage (0, 3, or "1 or 2") and DP size as DeepSpeed's file names tell them."""
    tp = {int(m.group(3)) for f in files if (m := _ENGINE_FILE.search(f))}
    zero3_dp = {int(m.group(2)) for f in files if (m := _ENGINE_FILE.search(f)) and m.group(1)}
    shards = {int(m.group(1)) for f in files if (m := _ZERO_OPTIM_FILE.search(f))}
    if zero3_dp:
        return {"tp_size": len(tp), "zero_stage": 3, "dp_size": len(zero3_dp)}
    if shards:
        return {"tp_size": len(tp), "zero_stage": "1 or 2", "dp_size": len(shards)}
    return {"tp_size": len(tp) or None, "zero_stage": 0 if tp else None, "dp_size": None}


def resumable_layouts(meta: dict[str, Any]) -> dict[str, Any]:
    """The layouts a run may resume this checkpoint on; the one place of that rule for this tool.

    ``meta`` holds ``kind``, ``tp_size``, ``zero_stage``, ``dp_size``, ``files`` and maybe
    ``tp_scheme``. Each of ``tp_size``, ``zero_stage``, ``dp_size`` in the result is ``"any"`` or the
    one value required; ``summary`` says it in words. Per-parameter optimizer files (``optim_tpNN.pt``)
    hold the optimizer state in a layout-free form: any layout. Otherwise (DeepSpeed's shards) the TP
    size, TP scheme and ZeRO stage must match, and the data-parallel size too when the optimizer state is
    sharded (ZeRO > 0); ``--no-load-optim`` lifts the ZeRO and DP conditions, ``--finetune`` (weights
    only) all of them.
    """
    if meta.get("kind") == "weights":
        return {
            "resume": False,
            "summary": "model files only (no optimizer state): load them with --finetune, on any layout",
        }
    if any(PER_PARAMETER_OPTIM.search(f) for f in meta.get("files", [])):
        return {
            "resume": True,
            "tp_size": "any",
            "zero_stage": "any",
            "dp_size": "any",
            "summary": "any layout (per-parameter optimizer state)",
        }
    tp, zero, dp = meta.get("tp_size"), meta.get("zero_stage"), meta.get("dp_size")
    dp_needed = dp if isinstance(zero, int) and zero > 0 else "any"
    parts = [f"TP {tp}", f"ZeRO-{zero}", "any DP size" if dp_needed == "any" else f"DP {dp}"]
    if isinstance(tp, int) and tp > 1 and meta.get("tp_scheme") not in (None, "dense"):
        parts[0] += f" (--cola-tp-scheme {meta['tp_scheme']})"  # another cut needs optim_tpNN.pt too
    return {
        "resume": True,
        "tp_size": tp,
        "zero_stage": zero,
        "dp_size": dp_needed,
        "summary": f"{', '.join(parts)} (--no-load-optim: any ZeRO stage and DP size, the optimizer "
        "starting afresh; --finetune: any layout, weights only)",
    }


def checkpoint_info(path: str, verify: bool = True) -> dict[str, Any]:
    """Everything ``tools/checkpoint_info.py`` prints about the checkpoint at ``path`` (see ``resolve``)."""
    root, ckpt_dir, which = resolve(path)
    files = _files(ckpt_dir)
    manifest = _manifest_status(ckpt_dir, verify)
    notes = [] if which is None else [f"{ckpt_dir} is {which}"]
    layout = _layout_from_files(files)
    engine_files = sorted(f for f in files if (m := _ENGINE_FILE.search(f)) and m.group(2) in (None, "0"))
    state: dict[str, Any] | None = None
    if engine_files:
        verified = manifest["status"] == "verified"
        state, note = _client_state(os.path.join(ckpt_dir, engine_files[0]), verified)
        if note:
            notes.append(note)
    state = state or {}
    args = state.get("args", {})
    model_files = sorted(f for f in files if _MODEL_FILE.match(f))
    model_meta, model_dtype = ({}, None)
    if model_files:
        model_meta, model_dtype = _model_file_meta(os.path.join(ckpt_dir, model_files[0]))
    kind = manifest.get("kind") or ("training" if engine_files else "weights")
    tp_size = layout["tp_size"] or model_meta.get("tp_size")
    zero_stage = state.get("zero_stage", layout["zero_stage"])
    world = state.get("world_size")
    dp_size = state.get("dp_world_size") or (world // tp_size if world and tp_size else layout["dp_size"])
    if args:
        dtype = "bf16" if args.get("bf16") else "fp32"
    else:
        dtype = model_dtype
    iteration = state.get("iteration", model_meta.get("iteration", tag_iteration(os.path.basename(ckpt_dir))))
    consumed = state.get("consumed_samples")
    info: dict[str, Any] = {
        "path": os.path.abspath(ckpt_dir),
        "root": os.path.abspath(root),
        "kind": kind,
        "iteration": iteration,
        "consumed_samples": consumed,
        "consumed_tokens": None
        if consumed is None or "seq_length" not in args
        else consumed * args["seq_length"],
        "tp_size": tp_size,
        # The cut the parameters were saved in (training/checkpointing.layout_scheme), else the flag.
        "tp_scheme": state.get("cola_tp_scheme", args.get("cola_tp_scheme")),
        "dp_size": dp_size,
        "world_size": world,
        "zero_stage": zero_stage,
        "dtype": dtype,
        "global_batch_size": args.get("global_batch_size"),
        "train_iters": args.get("train_iters"),
        "model_size": args.get("model_size"),
        "model_args": state.get("model_args") or model_meta.get("args"),
        "bytes": sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in files),
        "files": files,
        "manifest": manifest,
        "notes": notes,
    }
    info["resumable"] = resumable_layouts(info)
    return info


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def format_info(info: dict[str, Any]) -> str:
    """The human-readable report of ``checkpoint_info``."""
    m = info["manifest"]
    zero = info["zero_stage"]
    layout = [
        f"TP {info['tp_size']}",
        f"DP {info['dp_size'] if info['dp_size'] is not None else '?'}",
        f"ZeRO-{zero}" if zero is not None else "ZeRO stage unknown",
        info["dtype"] or "dtype unknown",
        f"TP scheme {info['tp_scheme']}" if info["tp_scheme"] else "TP scheme not recorded",
    ]
    if info["world_size"] is not None:
        layout.insert(2, f"world {info['world_size']}")
    progress = f"{info['iteration']}"
    if info["consumed_samples"] is not None:
        progress += f", consumed samples {info['consumed_samples']}"
        if info["consumed_tokens"] is not None:
            progress += f" ({info['consumed_tokens']} tokens)"
    if info["train_iters"] is not None:
        progress += f" (--train-iters {info['train_iters']})"
    status = m["status"]
    if "files" in m:
        status += f" ({m['files']} files, {ALGORITHM})"
    lines = [
        f"checkpoint:   {info['path']}",
        f"kind:         {info['kind']}",
        f"iteration:    {progress}",
        f"layout:       {', '.join(layout)}",
        f"size:         {_size(info['bytes'])} in {len(info['files'])} files",
        f"manifest:     {status}",
        *(f"  problem:    {p}" for p in m["problems"]),
        f"resumable on: {info['resumable']['summary']}",
        *(f"note:         {n}" for n in info["notes"]),
    ]
    return "\n".join(lines)
