"""Layout-free optimizer state: ``optim_tpNN.pt``, what a resume on another layout is rebuilt from.

DeepSpeed's optimizer files hold flat, data-parallel-partitioned buffers whose cut depends on the ZeRO
stage, the data-parallel size and the order of the parameter groups; they load only into the layout that
wrote them. Besides them, every save writes one file per tensor-parallel rank (by data-parallel rank 0
of that TP group, like the model files) that holds, per parameter name, the full (data-parallel-gathered,
un-flattened) TP-local tensors:

``format``       ``"megatron-cola-optim"``, ``version`` 1
``tp_rank``, ``tp_size``, ``split_dims`` (as in the model files: ``{name: dim}`` of TP-split parameters)
``zero_stage``, ``dp_size``, ``iteration``
``step``         Adam's step count (the same for every parameter)
``state``        ``{name: {"master": fp32 weight, "exp_avg": ..., "exp_avg_sq": ...}}``

Only tensors and plain types: they load with ``weights_only=True``. ``gather_optimizer_state`` reads the
state out of any DeepSpeed optimizer (ZeRO 0-3, fp32 or bf16; collective over the data-parallel group),
``restore_optimizer_state`` writes full tensors into one, cut for its layout by the model's
``ShardingPlan``. Megatron-LM's ``--dist-ckpt-optim-fully-reshardable`` and DeepSpeed's universal
checkpoints keep the same three tensors per parameter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from megatron_cola.checkpoint.io import CheckpointReader, compact
from megatron_cola.checkpoint.layout import optim_file_name
from megatron_cola.errors import CheckpointError

FORMAT = "megatron-cola-optim"
VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("master", *MOMENTS)
_PATTERN = "optim_tp*.pt"


# ------------------------------------------------------------------------------- the optimizer's kinds
class _Access:
    """Full per-parameter fp32 state of one engine's optimizer, whatever DeepSpeed made of it.

    ``kind``: ``"torch"`` (ZeRO-0 in fp32: the optimizer is ours, the parameters are the masters),
    ``"fragments"`` (ZeRO-1/2 and DeepSpeed's bf16 optimizer: each parameter maps to a fragment of a flat
    fp32 partition; DeepSpeed's ``safe_*_full_*`` functions, an all-reduce each) or ``"zero3"``
    (partitioned parameters; an all-gather each)."""

    def __init__(self, engine: Any) -> None:
        self.opt = engine.optimizer
        self.params = list(engine.module.named_parameters())
        first = self.params[0][1]
        if hasattr(first, "ds_id"):
            self.kind = "zero3"
        elif hasattr(first, "_hp_mapping"):
            self.kind = "fragments"
        else:
            self.kind = "torch"
        self.base = self.opt if self.kind == "torch" else self.opt.optimizer

    def flat_masters(self) -> list[torch.Tensor]:
        """The tensors the base optimizer keeps state for."""
        if self.kind == "torch":
            return [p for _, p in self.params]
        for attr in (
            "single_partition_of_fp32_groups",
            "fp32_groups_flat_partition",
            "fp32_partitioned_groups_flat",
        ):
            flats = getattr(self.opt, attr, None)
            if flats is not None:
                return list(flats)
        raise CheckpointError(
            f"unsupported DeepSpeed optimizer {type(self.opt).__name__}: no fp32 partitions"
        )

    def has_state(self) -> bool:
        return any(all(k in self.base.state.get(p, {}) for k in MOMENTS) for p in self.flat_masters())

    def relink(self) -> None:
        """Point every parameter's fragment at the base optimizer's current state tensors. DeepSpeed links
        them once, after the first group's first step, so the fragments of the second parameter group
        (the parameters without weight decay) never see theirs (DeepSpeed 0.19), and a loaded state dict
        replaces the tensors they point at."""
        if self.kind == "fragments" and self.has_state():
            self.opt._hp_optimizer_states_linked = False
            self.opt._lazy_init_hp_params_optimizer_state()

    def step(self) -> int:
        for p in self.flat_masters():
            step = self.base.state.get(p, {}).get("step")
            if step is not None:
                return int(step.item() if torch.is_tensor(step) else step)
        return 0

    def get(self, param: torch.nn.Parameter, key: str) -> torch.Tensor:
        """The full (TP-local) fp32 ``key`` of ``param``; collective for the DeepSpeed kinds."""
        state_key = None if key == "master" else key
        if self.kind == "torch":
            t = param if state_key is None else self.base.state[param][state_key]
            return t.detach().float()
        if self.kind == "zero3":
            return self.opt.get_full_hp_param(param, state_key)
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if state_key is None:
            return safe_get_full_fp32_param(param)
        return safe_get_full_optimizer_state(param, state_key)

    def init_state(self, step: int) -> None:
        """Adam's state tensors (zeros) at ``step``, created as the first ``step()`` would: torch's Adam(W)
        counts in a float32 tensor (on the parameter's device when fused), DeepSpeed's FusedAdam in an
        int per parameter (its group's ``step`` stays as it is)."""
        inner = self.base  # the optimizer that steps, under wrappers sharing its state (GuardedOptimizer)
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        torch_adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
        defaults = self.base.defaults
        on_device = bool(defaults.get("fused") or defaults.get("capturable"))
        for p in self.flat_masters():
            state = self.base.state[p]
            for k in MOMENTS:
                state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not torch_adam:
                state["step"] = int(step)
            else:
                device = p.device if on_device else "cpu"
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
        self.relink()

    def set(self, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
        """Set this rank's part of ``key`` of ``param`` from its full (TP-local) fp32 ``value``."""
        state_key = None if key == "master" else key
        if self.kind == "torch":
            target = param if state_key is None else self.base.state[param][state_key]
            with torch.no_grad():
                target.copy_(value)
            return
        if self.kind == "zero3":
            # DeepSpeed's set_full_hp_param cannot fill the padded last partition: cut it ourselves.
            part, _ = self.opt._get_fp32_opt_state_partition(
                param, release_swap_buffers=False, optim_state_key=state_key
            )
            rank = self.opt._get_param_partition_rank(param)
            flat = value.reshape(-1).to(part.dtype)
            start = part.numel() * rank
            piece = flat[start : start + part.numel()]
            with torch.no_grad():
                part.zero_()
                part[: piece.numel()].copy_(piece)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(torch.float32)
        if state_key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, state_key)

    def set_module(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set this rank's part of the module weight ``param`` from its full (TP-local) ``value``."""
        with torch.no_grad():
            if self.kind != "zero3":
                param.copy_(value)
                return
            part = param.ds_tensor
            rank = dist.get_rank(group=param.ds_process_group)
            flat = value.reshape(-1).to(part.dtype)
            piece = flat[part.numel() * rank : part.numel() * (rank + 1)]
            part.zero_()
            part.view(-1)[: piece.numel()].copy_(piece)

    def module_to_masters(self) -> None:
        """The fp32 masters from the module's weights (DeepSpeed's ``refresh_fp32_params``)."""
        if self.kind != "torch":
            self.opt.refresh_fp32_params()

    def masters_to_module(self) -> None:
        """The module's (bf16 or fp32) weights from the fp32 masters, as an optimizer step ends."""
        if self.kind == "fragments":
            self.opt.update_lp_params()
        elif self.kind == "zero3":
            with torch.no_grad():
                for lp, hp in zip(
                    self.opt.fp16_partitioned_groups_flat, self.opt.fp32_partitioned_groups_flat
                ):
                    lp.copy_(hp)


# ------------------------------------------------------------------------------------------- saving
def gather_optimizer_state(engine: Any, keep: bool) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """``({name: {"master", "exp_avg", "exp_avg_sq"}}, step)`` of this rank's (TP-local) parameters, on the
    CPU when ``keep`` (the writing rank; others get ``{}``). Collective over the data-parallel group for
    the DeepSpeed kinds: every rank calls it. Moments are zeros before the first step."""
    acc = _Access(engine)
    acc.relink()
    with_state = acc.has_state()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in acc.params:
        entry: dict[str, torch.Tensor] = {}
        for key in KEYS:
            if key != "master" and not with_state:
                t = torch.zeros(_full_local_shape(param), dtype=torch.float32)
            else:
                t = acc.get(param, key)
            if keep:  # DeepSpeed's gathers return fresh buffers; ZeRO-0's tensors are live: copied
                t = t.detach().to("cpu", torch.float32, copy=acc.kind == "torch")
                entry[key] = compact(t.contiguous())  # ZeRO-3's are views of padded buffers
        if keep:
            out[name] = entry
    return out, acc.step()


def _full_local_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def optim_file_payload(
    state: dict[str, dict[str, torch.Tensor]],
    step: int,
    split_dims: dict[str, int],
    tp_rank: int,
    tp_size: int,
    zero_stage: int,
    dp_size: int,
    iteration: int,
) -> dict[str, Any]:
    """What one TP rank's ``optim_tpNN.pt`` holds."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "split_dims": dict(split_dims),
        "zero_stage": zero_stage,
        "dp_size": dp_size,
        "iteration": iteration,
        "step": int(step),
        "state": state,
    }


# ------------------------------------------------------------------------------------------- loading
def has_optim_files(reader: CheckpointReader) -> bool:
    """Whether the checkpoint holds layout-free optimizer state."""
    return bool(reader.glob(_PATTERN))


def load_optim_files(reader: CheckpointReader) -> list[dict[str, Any]]:
    """Every TP rank's ``optim_tpNN.pt`` (memory-mapped, verified against the manifest), in rank order."""
    paths = reader.glob(_PATTERN)
    if not paths:
        raise CheckpointError(f"{reader.dir} holds no {_PATTERN} files (layout-free optimizer state)")
    reader.check_files([os.path.basename(p) for p in paths])
    files = []
    for p in paths:
        obj = reader.load_torch(p, mmap=True)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CheckpointError(f"{p} is not a Megatron-CoLA optimizer-state file")
        if obj.get("version") != VERSION:
            raise CheckpointError(f"{p} has format version {obj.get('version')}, this code reads {VERSION}")
        files.append(obj)
    files.sort(key=lambda f: f["tp_rank"])
    tp_size = files[0]["tp_size"]
    if [f["tp_rank"] for f in files] != list(range(tp_size)):
        raise CheckpointError(
            f"{reader.dir}: the optimizer state was written with tensor-parallel size {tp_size} but holds "
            f"the files of ranks {[f['tp_rank'] for f in files]}; a shard is missing"
        )
    return files


def full_tensor(files: list[dict[str, Any]], name: str, key: str) -> torch.Tensor:
    """The full (unsharded) ``key`` tensor of parameter ``name``, merged from the TP ranks' files."""
    if name not in files[0]["state"]:
        raise CheckpointError(f"the checkpoint's optimizer state has no parameter {name}")
    dim = files[0]["split_dims"].get(name)
    if dim is None or len(files) == 1:
        return files[0]["state"][name][key]
    return torch.cat([f["state"][name][key] for f in files], dim=dim)


def full_masters(files: list[dict[str, Any]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full fp32 master weight)`` of every parameter (for exports)."""
    for name in files[0]["state"]:
        yield name, full_tensor(files, name, "master")


def load_module_state(engine: Any, state: dict[str, torch.Tensor]) -> int:
    """Set ``engine``'s module weights (and fp32 masters) from full, unsharded tensors, cut for this rank
    by the model's ``ShardingPlan`` (a resume on another layout without the optimizer state). Returns the
    number of tensors set."""
    from megatron_cola.model.sharding import sharding_plan

    plan = sharding_plan(engine.module)
    acc = _Access(engine)
    for name, param in acc.params:
        if name not in state:
            raise CheckpointError(f"the checkpoint's model files have no parameter {name}")
        local = plan.shard(name, state[name]) if name in plan.specs else state[name]
        if tuple(local.shape) != _full_local_shape(param):
            raise CheckpointError(
                f"{name}: the checkpoint's weight cut for this layout is {tuple(local.shape)}, the parameter "
                f"is {_full_local_shape(param)}"
            )
        acc.set_module(param, local)
    acc.module_to_masters()
    return len(acc.params)


def restore_optimizer_state(engine: Any, files: list[dict[str, Any]]) -> tuple[int, int]:
    """Set ``engine``'s fp32 master weights, Adam moments and step from the layout-free ``files`` (any TP
    size and split), each cut for this rank by the model's ``ShardingPlan``; the module's weights follow
    from the masters. Collective. Returns ``(tensors set, step)``."""
    from megatron_cola.model.sharding import sharding_plan

    plan = sharding_plan(engine.module)
    acc = _Access(engine)
    step = int(files[0]["step"])
    saved = set(files[0]["state"])
    ours = {n for n, _ in acc.params}
    if saved != ours:
        missing, unexpected = sorted(ours - saved), sorted(saved - ours)
        raise CheckpointError(
            f"the checkpoint's optimizer state does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    acc.init_state(step)
    count = 0
    for name, param in acc.params:
        want = _full_local_shape(param)
        for key in KEYS:
            full = full_tensor(files, name, key)
            local = plan.shard(name, full) if name in plan.specs else full
            if tuple(local.shape) != want:
                raise CheckpointError(
                    f"optimizer state {key} of {name}: the checkpoint's {tuple(full.shape)} cut for this "
                    f"layout is {tuple(local.shape)}, the parameter is {want}"
                )
            acc.set(param, key, local)
            count += 1
    acc.masters_to_module()
    if dist.is_initialized():
        dist.barrier()
    return count, step


__all__ = [
    "FORMAT",
    "KEYS",
    "full_masters",
    "full_tensor",
    "gather_optimizer_state",
    "has_optim_files",
    "load_module_state",
    "load_optim_files",
    "optim_file_name",
    "optim_file_payload",
    "restore_optimizer_state",
]
