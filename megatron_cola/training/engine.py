"""The model, optimizer, LR schedule and DeepSpeed engine of a run, in the order they are applied:
``build_parallel_model`` (meta build → ``parallelize``: TP → recompute → compile → seeded weights,
ZeRO-3 partitioning as they are drawn), then ``build_engine`` (optimizer, schedule, DeepSpeed)."""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import torch

from megatron_cola.config import DEFAULT_TP_SCHEME, ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.parallel import ParallelState, parallelize
from megatron_cola.training.guards import guard_optimizer
from megatron_cola.training.logging_utils import print_rank_0
from megatron_cola.training.schedule import Schedule, build_scheduler
from megatron_cola.training.train_config import TrainConfig


def use_deepspeed_accelerator(device: torch.device | str) -> str:
    """Make DeepSpeed's accelerator follow the run's device (``--device``); returns its name.

    DeepSpeed picks its accelerator once, on first use: ``cuda`` whenever torch sees a GPU, whatever
    ``--device`` says, and then moves the module to ``cuda:0`` while the batches stay on the CPU. Call
    this before DeepSpeed is imported: it sets ``DS_ACCELERATOR``, which DeepSpeed reads then. If
    DeepSpeed was already imported (a test, a notebook) with another accelerator, it is replaced.
    """
    name = "cuda" if torch.device(device).type == "cuda" else "cpu"
    os.environ["DS_ACCELERATOR"] = name
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    current = getattr(real, "ds_accelerator", None) if real is not None else None
    if real is not None and current is not None and current._name != name:
        if name == "cuda":
            from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
        else:
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
        real.set_accelerator(Accelerator())
    return name


def build_parallel_model(
    seed: int,
    model_args: ModelArgs,
    parallel: ParallelState,
    device: torch.device,
    zero3_config: dict[str, Any] | None = None,
    *,
    scheme: str = DEFAULT_TP_SCHEME,
    compile_mode: str | None = None,
) -> CoLALlama:
    """The run's model on ``device``: built on the meta device, ``parallelize``d (tensor parallelism
    under ``scheme`` when ``parallel.tp_size > 1``, then recomputation, then ``torch.compile`` per block
    when ``compile_mode`` is given), and its weights drawn from ``seed``.

    With ``zero3_config`` (the run's DeepSpeed config, ZeRO stage 3) the model is partitioned as it is
    built: each module's parameters are allocated, drawn from the seed (full tensors, so the model is
    the same for any layout) and handed to ``deepspeed.zero.Init`` one module at a time, so no rank ever
    holds more than its partition plus one module's full weights.
    """
    with torch.device("meta"):
        model = CoLALlama(model_args)
    parallelize(model, parallel, scheme=scheme, compile_mode=compile_mode)
    if compile_mode is not None:
        mode = "" if compile_mode == "default" else f", mode={compile_mode}"
        print_rank_0(
            f"> compiled {len(model.layers)} decoder blocks (torch.compile, "
            f"recompute={model_args.recompute}{mode})"
        )
    if zero3_config is None:
        model.to_empty(device=device)
        model.init_weights(seed)  # every TP layout cuts its shards from the same full weights
        return model
    import deepspeed

    def partition(module: torch.nn.Module) -> None:
        # Partition over the data-parallel group (zero.Init's default is the whole world, which would
        # overwrite the TP shards of the other ranks with rank 0's).
        deepspeed.zero.Init(
            module=module,
            config_dict_or_path=zero3_config,
            mpu=parallel.mpu(),
            data_parallel_group=parallel.dp_group,
        )

    model.init_weights(seed, materialize_on=device, after_module=partition)
    return model


def compile_mode_of(cfg: TrainConfig) -> str | None:
    """``--compile``'s mode (``--compile-mode``), or ``None`` for an eager run."""
    return cfg.compile_mode if cfg.compile else None


def _full_ndim(param: torch.nn.Parameter) -> int:
    """Dimensions of the parameter (a ZeRO-3 partitioned one keeps its shape in ``ds_shape``)."""
    return len(getattr(param, "ds_shape", param.shape))


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """What ``build_optimizer`` made, as logged (``> optimizer: ...``) and recorded in results."""
    cls = type(optimizer)
    if cls.__module__.startswith("deepspeed"):
        return f"deepspeed {cls.__name__}"
    fused = optimizer.defaults.get("fused")
    return f"torch {cls.__name__}{' (fused)' if fused else ''}"


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms (Megatron's rule: 1-D parameters are not decayed).

    On CUDA, DeepSpeed's FusedAdam (its op is JIT-built with nvcc on first use); if that fails, torch's
    fused AdamW. Either way the line ``> optimizer: NAME`` says which one runs, with the reason for a
    fallback."""
    decay = [p for p in model.parameters() if _full_ndim(p) >= 2]
    no_decay = [p for p in model.parameters() if _full_ndim(p) < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    fallback = ""
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            optimizer = FusedAdam(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, adam_w_mode=True)
            print_rank_0(f"> optimizer: {optimizer_name(optimizer)}")
            return optimizer
        except Exception as e:  # the op needs a CUDA toolchain to JIT-build
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            fallback = f" (fallback: DeepSpeed FusedAdam unavailable: {reason})"
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, fused=True)
    print_rank_0(f"> optimizer: {optimizer_name(optimizer)}{fallback}")
    return optimizer


def build_engine(
    cfg: TrainConfig,
    model: torch.nn.Module,
    parallel: ParallelState,
    device: torch.device,
    ds_config: dict[str, Any],
) -> tuple[Any, Any]:
    """``(engine, scheduler)``: the optimizer and schedule wrapped by ``deepspeed.initialize`` with
    ``ds_config`` (``build_ds_config``, built once by the caller), around the ``parallelize``d model.
    The schedule drives the optimizer itself; DeepSpeed gets it through ``guard_optimizer`` (a
    ``GuardedOptimizer`` where the non-finite guard must be able to hold a step). Nothing is written:
    the trainer saves the DeepSpeed config into ``--save`` once a resume's checks passed."""
    import deepspeed

    optimizer = build_optimizer(cfg, model, device)
    scheduler = build_scheduler(optimizer, Schedule.from_values(cfg.to_dict()))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=guard_optimizer(cfg, optimizer),
        lr_scheduler=scheduler,
        config=copy.deepcopy(ds_config),  # the caller's copy stays as built (it is saved with the run)
        mpu=parallel.mpu(),
    )
    return engine, scheduler
