"""The entry point behind ``pretrain_cola.py``: flags -> ``TrainConfig`` -> process group -> ``Trainer``.

``pretrain(argv)`` runs one job and returns its loss history (used by tests); ``main()`` is the entry
point the launchers call: it prints a ``MegatronColaError`` (a user's mistake) without a traceback and
exits with status 2; any other exception is a bug and keeps its traceback. Works under ``deepspeed``,
``torchrun``, ``mpirun`` (mpi4py discovery), SLURM ``srun`` and as a single plain process, on CPU (gloo)
and GPU (nccl).
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.config import ModelArgs
from megatron_cola.data.tokenizers import AbstractTokenizer
from megatron_cola.errors import DataError, MegatronColaError
from megatron_cola.parallel.sizes import check_tensor_parallel_size, pad_vocab_size
from megatron_cola.training.arguments import (
    ArgumentError,
    build_train_config,
    given_flags,
    model_args_from,
    parse_args,
)
from megatron_cola.training.engine import use_deepspeed_accelerator
from megatron_cola.training.recipe import recipe_defaults
from megatron_cola.training.train_config import TrainConfig, format_flags
from megatron_cola.training.trainer import Trainer


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


#: Where launchers put a process's rank on its node, in the order they are read: torchrun, deepspeed and
#: our srun setup (LOCAL_RANK), Open MPI, MVAPICH2, MPICH / Intel MPI (Hydra), PMIx-style launchers,
#: then SLURM itself.
LOCAL_RANK_VARIABLES = (
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "PMI_LOCAL_RANK",
    "SLURM_LOCALID",
)


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank on its node, from the first of ``LOCAL_RANK_VARIABLES`` that is set (0 when
    none is: a single process). Picks the GPU, so MPICH or Intel MPI ranks no longer all take cuda:0."""
    env = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ArgumentError(f"{name}={value!r} is not a local rank (an integer)") from None
    return 0


def _resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ArgumentError("--device cuda but torch sees no GPU; use --device cpu")
        local_rank = local_rank_from_env()
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> bool:
    """Initialise the default process group; returns whether we did (and so must destroy it).

    First makes DeepSpeed's accelerator follow ``device`` (before DeepSpeed is imported), so that
    ``--device cpu`` on a machine with a GPU keeps the module on the CPU with its batches.
    ``--distributed-timeout-minutes`` becomes the timeout of the default group and the default of every
    group created later (ours in ``ParallelState``, DeepSpeed's own)."""
    from megatron_cola.parallel import set_default_group_timeout

    use_deepspeed_accelerator(device)
    timeout = timedelta(minutes=timeout_minutes)
    set_default_group_timeout(timeout)
    if dist.is_initialized():
        return False
    import deepspeed

    _prepare_launch_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return True


def _load_tokenizer(cfg: TrainConfig) -> AbstractTokenizer:
    from megatron_cola.data import build_tokenizer

    try:
        return build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_size)
    except MegatronColaError:
        raise
    except (RuntimeError, OSError, ValueError) as e:  # e.g. sentencepiece cannot parse the file
        raise DataError(
            f"cannot load --tokenizer-model {cfg.tokenizer_model} as {cfg.tokenizer_type}: {e}"
        ) from e


# ---------------------------------------------------------------------------------------------- start-up
#: Where launchers put the global rank before the process group exists (torchrun/deepspeed, Open MPI,
#: MPICH/Intel MPI, SLURM srun).
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
#: Likewise the number of processes on this node.
LOCAL_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS_PER_NODE",
)


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def format_arguments(cfg: TrainConfig, argv: list[str]) -> str:
    """Megatron's start-up block: every resolved value, then where they came from."""
    lines = ["------------------------ arguments ------------------------"]
    for name, value in sorted(cfg.to_dict().items()):
        if name == "user_ds_config":
            continue
        lines.append(f"  {name} {'.' * (48 - len(name))} {value}")
    lines.append("-------------------- end of arguments ---------------------")
    given = given_flags(argv)
    recipe = given.pop("config", None)
    given.pop("local_rank", None)
    if recipe is None:
        lines.append(f"> from the flags (defaults for the rest): {format_flags(given) or 'none given'}")
        return "\n".join(lines)
    defaults = recipe_defaults(recipe)
    changed, added = [], []
    for dest, value in given.items():
        word = format_flags({dest: value})
        if dest not in defaults:
            added.append(word)
        elif defaults[dest] != value:
            changed.append(f"{word} (recipe: {format_flags({dest: defaults[dest]}).split(' ', 1)[-1]})")
    lines.append(
        f"> from the recipe {recipe}; flags change: {', '.join(changed) or 'nothing'}; "
        f"flags add: {', '.join(added) or 'nothing'}"
    )
    return "\n".join(lines)


def machine_warnings(cfg: TrainConfig, model_args: ModelArgs, device: torch.device) -> list[str]:
    """On CPU: whether the weights, gradients and optimizer states alone outgrow this machine's RAM."""
    if device.type != "cpu":
        return []
    params = model_args.num_params()
    dp = cfg.data_parallel_size
    # bf16 weights + fp32 gradients (6 B) or fp32 weights + gradients (8 B); fp32 master weights and
    # Adam's two moments (12 B, 8 B without bf16), divided over data-parallel ranks by ZeRO.
    fixed, sharded = (6, 12) if cfg.bf16 else (8, 8)
    per_process = params * (fixed + sharded / (dp if cfg.zero_stage >= 1 else 1))
    processes = _first_int(LOCAL_SIZE_VARIABLES, cfg.world_size)
    need = per_process * processes
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return []
    if need <= ram:
        return []
    return [
        f"> warning: {cfg.model_size} ({params / 1e6:.0f}M params) on CPU needs at least "
        f"{need / 2**30:.1f} GiB for weights, gradients and optimizer states over {processes} "
        f"process(es) on this machine, which has {ram / 2**30:.1f} GiB of RAM: use GPUs, fewer "
        "processes, a smaller size, or the debug recipe (examples/pretrain_cola_debug.sh)"
    ]


def pretrain(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one pre-training job. Returns ``{"train": [(iteration, loss)], "valid": [...], "test": ...}``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = build_train_config(parse_args(argv))
    rank0 = _first_int(RANK_VARIABLES, 0) == 0
    if rank0:
        print(format_arguments(cfg, argv), flush=True)
    tokenizer = _load_tokenizer(cfg)
    tp = cfg.tensor_model_parallel_size
    model_args = model_args_from(
        cfg, pad_vocab_size(tokenizer.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    )
    check_tensor_parallel_size(tp, model_args=model_args, scheme=cfg.cola_tp_scheme)
    _prepare_launch_env()  # LOCAL_RANK etc. for srun / single process, before picking the GPU
    device = _resolve_device(cfg.device)
    if rank0:
        for line in machine_warnings(cfg, model_args, device):
            print(line, flush=True)

    created_pg = init_distributed(device, cfg.distributed_timeout_minutes)
    try:
        return Trainer(cfg, model_args, tokenizer, device).run()
    finally:
        if created_pg and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _report_error(message: str) -> None:
    """Print a user's error plainly; under our launchers also leave it for them to print last
    (``MEGATRON_COLA_ERROR_DIR``, below a launcher's own traceback)."""
    print(f"pretrain_cola.py: error: {message}", file=sys.stderr, flush=True)
    directory = os.environ.get("MEGATRON_COLA_ERROR_DIR")
    if directory and os.path.isdir(directory):
        rank = _first_int(RANK_VARIABLES, 0)
        try:
            atomic_write_text(os.path.join(directory, f"rank{rank}.txt"), message + "\n")
        except OSError:
            pass  # the message is on stderr already


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed 0.19 still calls a c10d API that torch 2.13 marks deprecated, once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    # A fatal signal (SIGSEGV, SIGBUS from a memory-mapped file that shrank, SIGABRT) prints every
    # thread's Python stack to stderr before the rank dies, instead of nothing.
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    try:
        pretrain(argv)
    except MegatronColaError as e:
        # Bad flags, data or checkpoints: the message says what to change; the traceback would only hide
        # it (set MEGATRON_COLA_TRACEBACK=1 to see it anyway).
        if os.environ.get("MEGATRON_COLA_TRACEBACK"):
            raise
        _report_error(str(e))
        return 2
    return 0
