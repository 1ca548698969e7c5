"""The pre-training job behind ``pretrain_cola.py``: setup, DeepSpeed engine, train loop, evaluation.

``pretrain(argv)`` runs one job and returns its loss history (used by tests); ``main()`` is the entry
point the launchers call. Works under ``deepspeed``, ``torchrun``, ``mpirun`` (mpi4py discovery),
SLURM ``srun`` and as a single plain process, on CPU (gloo) and GPU (nccl).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama
from megatron_cola.model.flops import training_flops_per_token
from megatron_cola.training import checkpointing
from megatron_cola.training.arguments import (
    ArgumentError,
    model_args_from,
    pad_vocab_size,
    parse_args,
    validate_args,
)
from megatron_cola.training.ds_config import build_ds_config, save_ds_config
from megatron_cola.training.logging_utils import (
    MetricsWriter,
    format_train_line,
    peak_memory_gb,
    peak_tflops,
    print_rank_0,
)
from megatron_cola.training.model_files import read_latest
from megatron_cola.training.schedule import build_scheduler


# ---------------------------------------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_launch_env() -> None:
    """Fill torch.distributed's env variables for srun and plain single-process runs.

    torchrun and the deepspeed launcher set them; mpirun is handled by DeepSpeed's mpi4py discovery.
    """
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ:
            raise ArgumentError("under srun, export MASTER_ADDR (and MASTER_PORT) in the sbatch script")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ArgumentError("--device cuda but torch sees no GPU; use --device cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_distributed(device: torch.device) -> bool:
    """Initialise the default process group; returns whether we did (and so must destroy it)."""
    if dist.is_initialized():
        return False
    import deepspeed

    _prepare_launch_env()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return True


def _build_parallel_state(tp_size: int) -> Any:
    from megatron_cola.parallel import ParallelState

    return ParallelState.from_torch_distributed(tp_size)


def _build_model(args: argparse.Namespace, model_args: ModelArgs, parallel: Any, device: torch.device):
    with torch.device("meta"):
        model = CoLALlama(model_args)
    if parallel.tp_size > 1:
        from megatron_cola.parallel import apply_tensor_parallel

        apply_tensor_parallel(model, parallel)
    model.to_empty(device=device)
    model.init_weights(args.seed)  # every TP layout cuts its shards from the same full weights
    return model


def _split_dims(model: torch.nn.Module, parallel: Any) -> dict[str, int]:
    if parallel.tp_size == 1:
        return {}
    from megatron_cola.parallel import tp_split_dims

    return tp_split_dims(model)


def _build_optimizer(args: argparse.Namespace, model: torch.nn.Module, device: torch.device):
    """AdamW without weight decay on norms (Megatron's rule: 1-D parameters are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (args.adam_beta1, args.adam_beta2)
    if device.type == "cuda":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, lr=args.lr, betas=betas, eps=args.adam_eps, adam_w_mode=True)
        except Exception as e:  # the op needs a CUDA toolchain to JIT-build
            print_rank_0(f"DeepSpeed FusedAdam unavailable ({e}); using torch's fused AdamW")
    return torch.optim.AdamW(groups, lr=args.lr, betas=betas, eps=args.adam_eps, fused=True)


def _tokenizer_info(args: argparse.Namespace) -> dict[str, Any]:
    model = os.path.abspath(args.tokenizer_model) if args.tokenizer_model else None
    return {"type": args.tokenizer_type, "model": model, "vocab_size": args.vocab_size}


# ---------------------------------------------------------------------------------------------- data
def _build_data(args: argparse.Namespace, parallel: Any):
    from megatron_cola.data import build_train_valid_test_datasets

    gbs = args.global_batch_size
    evals = args.train_iters // args.eval_interval + 1
    num_samples = (args.train_iters * gbs, evals * args.eval_iters * gbs, args.eval_iters * gbs)
    return build_train_valid_test_datasets(
        args.data_path, args.split, args.seq_length, num_samples, args.seed, args.data_cache_path
    )


def _loader(args: argparse.Namespace, dataset: Any, consumed: int, parallel: Any):
    from megatron_cola.data import PretrainingSampler

    sampler = PretrainingSampler(
        len(dataset), consumed, args.micro_batch_size, parallel.dp_rank, parallel.dp_size
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=False
    )


def _check_token_ids(dataset: Any, vocab_size: int, args: argparse.Namespace, probe: int = 64) -> None:
    """Fail early (not with an embedding index error mid-run) when the data was tokenized differently."""
    n = min(len(dataset), probe)
    top = max(int(np.max(dataset[i]["text"])) for i in range(n)) if n else 0
    if top >= vocab_size:
        raise ArgumentError(
            f"--data-path holds token id {top}, but the tokenizer ({args.tokenizer_type} "
            f"{args.tokenizer_model or ''}) has only {vocab_size} ids: preprocess the data with the same "
            "tokenizer you train with"
        )


def _tokens_and_labels(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.as_tensor(batch["text"]).long().to(device, non_blocking=True)  # (mbs, seq + 1)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()


def _dp_mean(value: torch.Tensor, parallel: Any) -> float:
    value = value.detach().float().clone()
    if parallel.dp_size > 1:
        dist.all_reduce(value, group=parallel.dp_group)
        value /= parallel.dp_size
    return float(value)


# ---------------------------------------------------------------------------------------------- loop
@torch.no_grad()
def evaluate(
    engine: Any, args: argparse.Namespace, dataset: Any, parallel: Any, device: torch.device
) -> float:
    """Mean loss over ``eval_iters`` global batches (the same batches at every evaluation)."""
    engine.eval()
    it = iter(_loader(args, dataset, 0, parallel))
    losses = []
    for _ in range(args.eval_iters * args.gradient_accumulation_steps):
        tokens, labels = _tokens_and_labels(next(it), device)
        losses.append(engine(tokens, labels).float())
    engine.train()
    return _dp_mean(torch.stack(losses).mean(), parallel)


def _log_eval(name: str, loss: float, iteration: int, consumed: int, args, writer: MetricsWriter) -> None:
    ppl = math.exp(min(loss, 20.0))
    line = f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    bar = "-" * len(line)
    print_rank_0(f"{bar}\n{line}\n{bar}")
    writer.write(
        name,
        {"iteration": iteration, "consumed_tokens": consumed * args.seq_length, "lm_loss": loss, "ppl": ppl},
    )


def pretrain(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one pre-training job. Returns ``{"train": [(iteration, loss)], "valid": [...], "test": ...}``."""
    args = parse_args(argv)
    validate_args(args)
    from megatron_cola.data import build_tokenizer

    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    except (RuntimeError, OSError, ValueError) as e:  # e.g. sentencepiece cannot parse the file
        raise ArgumentError(
            f"cannot load --tokenizer-model {args.tokenizer_model} as {args.tokenizer_type}: {e}"
        ) from e
    tp = args.tensor_model_parallel_size
    vocab = pad_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by, tp)
    model_args = model_args_from(args, vocab)
    if tp > 1:
        from megatron_cola.parallel import check_tensor_parallel_sizes

        try:
            check_tensor_parallel_sizes(model_args, tp)
        except ValueError as e:
            raise ArgumentError(str(e)) from e
    _prepare_launch_env()  # LOCAL_RANK etc. for srun / single process, before picking the GPU
    device = _resolve_device(args.device)

    created_pg = _init_distributed(device)
    try:
        return _run(args, model_args, tokenizer, device)
    finally:
        if created_pg and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _run(args: argparse.Namespace, model_args: ModelArgs, tokenizer: Any, device: torch.device) -> dict:
    import deepspeed

    if dist.get_world_size() != args.world_size:
        raise ArgumentError(f"launcher world size {dist.get_world_size()} != expected {args.world_size}")
    parallel = _build_parallel_state(args.tensor_model_parallel_size)
    rank = dist.get_rank()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    print_rank_0(
        f"> Megatron-CoLA: {args.model_size} {'full rank' if model_args.full_rank else 'CoLA'} "
        f"({model_args.num_params() / 1e6:.1f}M params), world {args.world_size} = "
        f"TP {parallel.tp_size} x DP {parallel.dp_size}, ZeRO-{args.zero_stage}, "
        f"{'bf16' if args.bf16 else 'fp32'}, recompute={args.recompute}, device={device.type}, "
        f"global batch {args.global_batch_size} = {args.micro_batch_size} x {parallel.dp_size} x "
        f"{args.gradient_accumulation_steps}"
    )
    resume_dir_tag = read_latest(args.load) if args.load else None
    if args.load and resume_dir_tag is None:
        print_rank_0(f"> no checkpoint in {args.load} yet: starting from scratch")
    weights_only = (
        args.load
        and resume_dir_tag is not None
        and (args.finetune or not checkpointing.has_deepspeed_state(os.path.join(args.load, resume_dir_tag)))
    )
    if weights_only:
        # Weights from elsewhere (an HF import, another layout): their architecture details win over
        # the size's defaults (e.g. a Llama-2 import's rms_norm_eps, a Llama-3 import's rope_theta).
        model_args, adopted = checkpointing.adopt_architecture(model_args, args.load)
        if adopted:
            print_rank_0(f"> from the checkpoint: {adopted}")
    model = _build_model(args, model_args, parallel, device)
    if weights_only:
        checkpointing.load_weights_only(model, args.load, seed=args.seed, init_std=model_args.init_std)
        print_rank_0(f"> loaded weights only from {args.load}/{resume_dir_tag}; starting at iteration 0")

    optimizer = _build_optimizer(args, model, device)
    scheduler = build_scheduler(
        optimizer, args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters, args.lr_decay_style
    )
    ds_config = build_ds_config(args)
    if args.save and rank == 0:
        save_ds_config(ds_config, args.save)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=parallel.mpu()
    )

    iteration, consumed = 0, 0
    if args.load and not weights_only:
        resumed = checkpointing.load_checkpoint(engine, args, model_args)
        if resumed is not None:
            iteration, consumed = resumed
            print_rank_0(f"> resumed from {args.load}/{resume_dir_tag} at iteration {iteration}")

    train_ds, valid_ds, test_ds = _build_data(args, parallel)
    writer = MetricsWriter(args.tensorboard_dir, enabled=rank == 0)
    split_dims = _split_dims(engine.module, parallel)
    save_kw = dict(
        parallel=parallel,
        tokenizer_info=_tokenizer_info(args),
        vocab_size=tokenizer.vocab_size,
        split_dims=split_dims,
    )
    history: dict[str, Any] = {"train": [], "valid": [], "test": None, "start_iteration": iteration}
    flops_per_token = training_flops_per_token(model_args, args.seq_length)
    peak = peak_tflops(device)
    tokens_per_step = args.global_batch_size * args.seq_length

    _check_token_ids(train_ds, tokenizer.vocab_size, args)
    train_iter = iter(_loader(args, train_ds, consumed, parallel)) if iteration < args.train_iters else None
    window: list[float] = []
    last_saved = None
    t_window = time.perf_counter()
    while iteration < args.train_iters:
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            tokens, labels = _tokens_and_labels(next(train_iter), device)
            loss = engine(tokens, labels)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        iteration += 1
        consumed += args.global_batch_size
        loss_value = _dp_mean(torch.stack(losses).mean(), parallel)
        history["train"].append((iteration, loss_value))
        window.append(loss_value)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        lr = scheduler.get_last_lr()[0]
        writer.write(
            "train",
            {
                "iteration": iteration,
                "consumed_tokens": consumed * args.seq_length,
                "lm_loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
            },
        )

        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t_window
            step_time = elapsed / len(window)
            tokens_per_s = tokens_per_step / step_time
            tflops = flops_per_token * tokens_per_s / args.world_size / 1e12
            metrics = {
                "iteration": iteration,
                "train_iters": args.train_iters,
                "consumed_samples": consumed,
                "consumed_tokens": consumed * args.seq_length,
                "step_time_ms": 1000 * step_time,
                "lr": lr,
                "global_batch_size": args.global_batch_size,
                "lm_loss": sum(window) / len(window),
                "grad_norm": grad_norm,
                "tokens_per_second": tokens_per_s,
                "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None,
                "peak_memory_gb": peak_memory_gb(device),
            }
            print_rank_0(format_train_line(metrics))
            writer.write("throughput", {k: v for k, v in metrics.items() if k != "train_iters"})
            window = []
            t_window = time.perf_counter()

        if valid_ds is not None and args.eval_iters > 0 and iteration % args.eval_interval == 0:
            loss_v = evaluate(engine, args, valid_ds, parallel, device)
            history["valid"].append((iteration, loss_v))
            _log_eval("validation", loss_v, iteration, consumed, args, writer)
            t_window = time.perf_counter()
        stop = args.exit_interval is not None and iteration % args.exit_interval == 0
        if args.save and (
            (args.save_interval and iteration % args.save_interval == 0)
            or stop
            or iteration == args.train_iters
        ):
            path = checkpointing.save_checkpoint(
                engine, args, model_args, iteration=iteration, consumed_samples=consumed, **save_kw
            )
            last_saved = iteration
            print_rank_0(f"> saved checkpoint {path}")
            t_window = time.perf_counter()
        if stop:
            print_rank_0(f"> exiting after iteration {iteration} (--exit-interval {args.exit_interval})")
            break

    if iteration >= args.train_iters:
        if args.save and last_saved != iteration and iteration > history["start_iteration"]:
            checkpointing.save_checkpoint(
                engine, args, model_args, iteration=iteration, consumed_samples=consumed, **save_kw
            )
        if (
            valid_ds is not None
            and args.eval_iters > 0
            and (not history["valid"] or history["valid"][-1][0] != iteration)
        ):
            loss_v = evaluate(engine, args, valid_ds, parallel, device)
            history["valid"].append((iteration, loss_v))
            _log_eval("validation", loss_v, iteration, consumed, args, writer)
        if test_ds is not None and args.eval_iters > 0:
            history["test"] = evaluate(engine, args, test_ds, parallel, device)
            _log_eval("test", history["test"], iteration, consumed, args, writer)
    writer.close()
    history["iteration"] = iteration
    return history


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed 0.19 still calls a c10d API that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    try:
        pretrain(argv)
    except (ArgumentError, checkpointing.CheckpointError, ValueError, FileNotFoundError) as e:
        # Bad flags, data or checkpoints: the message says what to change; the traceback would only hide
        # it (set MEGATRON_COLA_TRACEBACK=1 to see it anyway).
        if os.environ.get("MEGATRON_COLA_TRACEBACK"):
            raise
        print(f"pretrain_cola.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
