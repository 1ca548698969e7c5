"""The launchers' one resolver: size + environment knobs -> ``pretrain_cola.py``'s flags and the layout.

``examples/pretrain_cola_<size>.sh`` runs ``examples/common.sh <size>``, which runs
``python -m megatron_cola.launch <size> [flags]``: :func:`resolve` turns the recipe
(``recipes/<size>.toml``) and the environment (``DATA_PATH``, ``TP``, ``ZERO_STAGE``, ``SAVE_DIR``, ...;
the table in docs/launching.md) into ``pretrain_cola.py --config recipes/<size>.toml <overrides>``, and
:func:`main` starts the ranks with ``LAUNCHER`` (deepspeed, torchrun, srun, mpirun; ``none`` prints the
command). The launcher runs as a child: signals are passed on to it, and when it fails, the ranks' own
one-line error (written to ``MEGATRON_COLA_ERROR_DIR``) is printed last, below the launcher's traceback.

``deepspeed examples/pretrain_cola_<size>.sh`` runs the size script with python on every rank: its
Python half calls :func:`run_rank`, which resolves the same flags and becomes ``pretrain_cola.py``.
DeepSpeed's runner forwards no signal to its launch.py on a single node; a rank whose launch.py was
orphaned acts as if it got SIGTERM (``training/watchdog.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from megatron_cola.config import SIZES, lookup_size
from megatron_cola.errors import ConfigError
from megatron_cola.training.recipe import read_recipe, recipe_path
from megatron_cola.training.train_config import SHAPE_OVERRIDES, format_flags, given_flags

REPO_DIR = Path(__file__).resolve().parents[1]
ENTRY = REPO_DIR / "pretrain_cola.py"
LAUNCHERS = ("deepspeed", "torchrun", "srun", "mpirun", "none")
ERROR_DIR_VARIABLE = "MEGATRON_COLA_ERROR_DIR"
"""Where each rank writes its one-line error (``rank<N>.txt``) for the launcher to print last."""

#: Environment knob -> the flag it sets (a value given in the environment wins over the recipe).
ENV_FLAGS: dict[str, str] = {
    "TOKENIZER_TYPE": "--tokenizer-type",
    "TP": "--tensor-model-parallel-size",
    "MICRO_BATCH": "--micro-batch-size",
    "GLOBAL_BATCH": "--global-batch-size",
    "SEQ_LENGTH": "--seq-length",
    "TRAIN_ITERS": "--train-iters",
    "SPLIT": "--split",
    "DEVICE": "--device",
    "EVAL_INTERVAL": "--eval-interval",
    "EVAL_ITERS": "--eval-iters",
    "LOG_INTERVAL": "--log-interval",
}
CPU_RANKS = 2
"""Ranks per node when no GPU is found and ``GPUS_PER_NODE`` is unset (the CPU quickstart's 2)."""


@dataclass(frozen=True)
class Plan:
    """What a launch runs: ``pretrain_cola.py``'s flags, where it saves, and the cluster layout."""

    size: str
    flags: list[str]
    save_dir: str
    nnodes: int
    gpus_per_node: int
    notes: list[str] = field(default_factory=list)


def resolve(size: str, argv: list[str], environ: Mapping[str, str] | None = None) -> Plan:
    """The flags of ``size``'s recipe in this environment, ``EXTRA_ARGS`` and ``argv`` appended (last
    wins). Raises ``ConfigError`` naming a missing or malformed variable."""
    env = os.environ if environ is None else environ
    path = recipe_path(size)
    recipe = read_recipe(path)
    launcher = recipe.get("launcher", {})
    model = recipe.get("model", {})
    size_name = str(model.get("model_size", size))
    extra = shlex.split(env.get("EXTRA_ARGS", ""))
    user = [*extra, *argv]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            given = given_flags(user)
    except SystemExit:  # a malformed flag: pretrain_cola.py reports it
        given = {}
    full_rank = _flag_env(env, "FULL_RANK") or bool(given.get("full_rank"))
    variant = "full" if full_rank else "cola"

    flags = ["--config", str(path)]
    flags += ["--data-path", *_required(env, "DATA_PATH", launcher).split()]
    flags += ["--tokenizer-model", _required(env, "TOKENIZER_MODEL", launcher)]
    for name, flag in ENV_FLAGS.items():
        if env.get(name):
            flags += [flag, env[name]]
    if env.get("DS_CONFIG"):
        flags += ["--deepspeed_config", env["DS_CONFIG"]]  # ZeRO stage and clipping come from the file
    elif env.get("ZERO_STAGE"):
        flags += ["--zero-stage", env["ZERO_STAGE"]]
    flags += _warmup(env, recipe)
    if _flag_env(env, "FULL_RANK"):
        flags.append("--full-rank")
    recompute = env.get("RECOMPUTE") or ("full" if full_rank and model.get("recompute") == "cola-m" else None)
    if recompute:
        flags += ["--recompute", recompute]
    ffn = env.get("FFN_HIDDEN_SIZE") or _ffn_for_tp(size_name, env.get("TP"))
    if ffn:
        flags += ["--ffn-hidden-size", str(ffn)]
    if not _flag_env(env, "EXIT_SIGNAL_HANDLER", default=True):
        flags.append("--no-exit-signal-handler")

    save_dir = env.get("SAVE_DIR") or _default_save_dir(size_name, variant, launcher, given, env)
    flags += ["--save", save_dir, "--load", save_dir]
    flags += ["--save-interval", env.get("SAVE_INTERVAL") or str(launcher.get("save_interval", 1000))]
    flags += ["--tensorboard-dir", env.get("TB_DIR") or os.path.join(save_dir, "tensorboard")]
    flags += user

    notes: list[str] = []
    nnodes = _int_env(env, "NNODES", 1)
    gpus = _gpus_per_node(env, launcher, notes)
    return Plan(size_name, flags, given.get("save") or save_dir, nnodes, gpus, notes)


# ------------------------------------------------------------------------------------------ knobs
def _required(env: Mapping[str, str], name: str, launcher: Mapping[str, Any]) -> str:
    if env.get(name):
        return env[name]
    default = launcher.get(name.lower())
    if default is not None:
        return " ".join(str(REPO_DIR / word) for word in default.split())
    what = {
        "DATA_PATH": "a preprocessed prefix (tools/preprocess_data.py)",
        "TOKENIZER_MODEL": "the tokenizer used to preprocess",
    }[name]
    hint = "set it in the environment"
    if "LOCAL_RANK" in env or "RANK" in env:
        hint += (
            " (ranks on other nodes of a deepspeed --hostfile launch see only the variables listed in "
            ".deepspeed_env; or run 'bash examples/pretrain_cola_<size>.sh' with HOSTFILE)"
        )
    raise ConfigError(f"{name}: {what}; {hint}")


def _flag_env(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name, "")
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ConfigError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"{name} must be >= 1, got {number}")
    return number


def _warmup(env: Mapping[str, str], recipe: Mapping[str, Any]) -> list[str]:
    """``WARMUP``; else, with ``TRAIN_ITERS`` and a recipe ``warmup_fraction``, the smaller of the
    recipe's warmup and that fraction of the run (the debug recipe: 10%, at most 20)."""
    if env.get("WARMUP"):
        return ["--lr-warmup-iters", env["WARMUP"]]
    fraction = recipe.get("launcher", {}).get("warmup_fraction")
    if fraction is None or not env.get("TRAIN_ITERS"):
        return []
    iters = _int_env(env, "TRAIN_ITERS", 1)
    warmup = recipe.get("schedule", {}).get("lr_warmup_iters", 0)
    return ["--lr-warmup-iters", str(min(warmup, int(iters * fraction)))]


def _ffn_for_tp(size: str, tp: str | None) -> int | None:
    """A size's ffn that TP does not divide (1B's 5461) is padded to the next multiple of TP (a 0.02%
    larger MLP for 1B); ``None`` when it divides."""
    if not tp or not tp.isdigit() or int(tp) <= 1:
        return None
    ffn = SIZES[lookup_size(size)].ffn_hidden_size
    t = int(tp)
    return None if ffn % t == 0 else (ffn + t - 1) // t * t


def _default_save_dir(
    size: str, variant: str, launcher: Mapping[str, Any], given: Mapping[str, Any], env: Mapping[str, str]
) -> str:
    """``<checkout>/checkpoints/<variant>_<SIZE>`` (the recipe's ``save_dir`` for debug), with a short
    hash of the shape overrides when some are given: a run with ``--num-layers 4`` never resumes from,
    or overwrites, the unmodified size's checkpoints."""
    pattern = launcher.get("save_dir")
    base = str(REPO_DIR / pattern.format(variant=variant)) if pattern else None
    if base is None:
        base = str(REPO_DIR / "checkpoints" / f"{variant}_{size}")
    shape = {k: given[k] for k in SHAPE_OVERRIDES if k in given}
    if env.get("FFN_HIDDEN_SIZE"):
        shape.setdefault("ffn_hidden_size", env["FFN_HIDDEN_SIZE"])
    if not shape:
        return base
    digest = hashlib.sha256(format_flags(dict(sorted(shape.items()))).encode()).hexdigest()[:8]
    return f"{base}_{digest}"


def _gpus_per_node(env: Mapping[str, str], launcher: Mapping[str, Any], notes: list[str]) -> int:
    if env.get("GPUS_PER_NODE"):
        return _int_env(env, "GPUS_PER_NODE", 1)
    if env.get("NPROC"):
        return _int_env(env, "NPROC", 1)
    if "gpus_per_node" in launcher:
        return int(launcher["gpus_per_node"])
    count = visible_gpus()
    if count:
        return count
    notes.append(f"no GPU found: starting {CPU_RANKS} CPU ranks per node (set GPUS_PER_NODE to change that)")
    return CPU_RANKS


def visible_gpus() -> int:
    """``torch.cuda.device_count()``; 0 without importing torch when no GPU driver is present."""
    if not any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        return 0
    import torch

    return torch.cuda.device_count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ launchers
def launcher_command(plan: Plan, env: Mapping[str, str], python: str = sys.executable) -> list[str]:
    """The command that starts every rank of ``plan`` with ``env['LAUNCHER']`` (default deepspeed)."""
    kind = env.get("LAUNCHER") or "deepspeed"
    rank = [str(ENTRY), *plan.flags]
    port = env["MASTER_PORT"]
    if kind == "deepspeed":
        cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--num_nodes", str(plan.nnodes)]
        cmd += ["--num_gpus", str(plan.gpus_per_node), "--master_port", port]
        cmd += shlex.split(env.get("DS_LAUNCHER_ARGS", ""))
        # A hostfile makes the runner start every node over pdsh/ssh (even a single one).
        if env.get("HOSTFILE"):
            cmd += ["--hostfile", env["HOSTFILE"]]
        if env.get("MASTER_ADDR"):
            cmd += ["--master_addr", env["MASTER_ADDR"]]
        return cmd + rank
    if kind == "torchrun":
        endpoint = f"{env.get('MASTER_ADDR') or '127.0.0.1'}:{port}"
        cmd = [python, "-u", "-m", "torch.distributed.run", "--nnodes", str(plan.nnodes)]
        cmd += ["--nproc_per_node", str(plan.gpus_per_node), "--rdzv_backend", "c10d"]
        return cmd + ["--rdzv_endpoint", endpoint, *rank]
    if kind == "srun":
        nodes = env.get("SLURM_NNODES") or str(plan.nnodes)
        cmd = ["srun", "--nodes", nodes, "--ntasks-per-node", str(plan.gpus_per_node), "--kill-on-bad-exit=1"]
        # Slurm 22.05's srun does not inherit the allocation's --cpus-per-task: pass it on.
        if env.get("SLURM_CPUS_PER_TASK"):
            cmd += ["--cpus-per-task", env["SLURM_CPUS_PER_TASK"]]
        return [*cmd, python, "-u", *rank]
    if kind == "mpirun":
        np_ = env.get("NP") or str(plan.nnodes * plan.gpus_per_node)
        cmd = ["mpirun", "-np", np_, "-x", "OMP_NUM_THREADS", "-x", "PATH", "-x", f"MASTER_PORT={port}"]
        cmd += ["-x", ERROR_DIR_VARIABLE]
        if env.get("MASTER_ADDR"):
            cmd += ["-x", f"MASTER_ADDR={env['MASTER_ADDR']}"]
        if env.get("HOSTS"):
            cmd += ["--host", env["HOSTS"]]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        if not env.get("HOSTS") and int(np_) > (os.cpu_count() or 1):
            cmd.append("--oversubscribe")
        return [*cmd, python, "-u", *rank]
    raise ConfigError(f"LAUNCHER must be one of {', '.join(LAUNCHERS)}, got {kind!r}")


def _launch_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default: one thread per rank unless asked
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(_free_port()) if plan.nnodes == 1 else "29500"
    if env.get("LAUNCHER") == "srun":
        if not env.get("SLURM_JOB_ID"):
            raise ConfigError("LAUNCHER=srun runs inside a SLURM allocation (sbatch or salloc)")
        if not env.get("MASTER_ADDR"):
            nodes = subprocess.run(
                ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            env["MASTER_ADDR"] = nodes[0]
    return env


def run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher as a child and return its status (``-N``: killed by signal N).

    SIGTERM, SIGUSR1, SIGUSR2, SIGHUP and SIGINT sent to this process are passed on to the launcher
    (srun and torchrun relay them to the ranks), except SIGINT while this process group is the
    terminal's foreground: that is Ctrl-C, which reached the launcher from the terminal itself. When the
    launcher fails, each distinct error the ranks wrote is printed last.
    """
    with tempfile.TemporaryDirectory(prefix="megatron-cola-errors-") as errors:
        env = {**env, ERROR_DIR_VARIABLE: env.get(ERROR_DIR_VARIABLE) or errors}
        child = subprocess.Popen(cmd, env=env)

        def forward(signum: int, _frame: Any) -> None:
            if signum == signal.SIGINT and _in_terminal_foreground():
                return
            child.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, forward)
        status = child.wait()
        if status != 0:
            report_rank_errors(env[ERROR_DIR_VARIABLE])
    return status


def _in_terminal_foreground() -> bool:
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def report_rank_errors(directory: str) -> None:
    """Print the ranks' distinct one-line errors (``rank<N>.txt``), naming the ranks, to stderr."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    by_message: dict[str, list[str]] = {}
    for name in names:
        if name.startswith("rank") and name.endswith(".txt"):
            with open(os.path.join(directory, name)) as f:
                by_message.setdefault(f.read().strip(), []).append(name[4:-4])
    for message, ranks in by_message.items():
        which = "rank " + ranks[0] if len(ranks) == 1 else f"ranks {', '.join(sorted(ranks, key=int))}"
        print(f"\npretrain_cola.py ({which}): error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_cola.launch [--save-dir] SIZE [flags]``: start (or, ``LAUNCHER=none``, print)
    the ranks of ``SIZE``'s recipe; ``--save-dir`` prints only where they save."""
    argv = sys.argv[1:] if argv is None else argv
    print_save_dir = bool(argv) and argv[0] == "--save-dir"
    argv = argv[1:] if print_save_dir else argv
    if not argv or argv[0].startswith("-"):
        print(
            "usage: python -m megatron_cola.launch [--save-dir] SIZE [pretrain_cola.py flags]",
            file=sys.stderr,
        )
        return 2
    try:
        plan = resolve(argv[0], argv[1:])
        if print_save_dir:
            print(plan.save_dir)
            return 0
        env = _launch_env(plan)
        if (env.get("LAUNCHER") or "deepspeed") == "none":
            for note in plan.notes:
                print(f"# note: {note}")
            print(
                f"# MASTER_ADDR={env.get('MASTER_ADDR', '')} MASTER_PORT={env['MASTER_PORT']} "
                f"NNODES={plan.nnodes} GPUS_PER_NODE={plan.gpus_per_node}"
            )
            print(shlex.join(["python", str(ENTRY), *plan.flags]))
            return 0
        cmd = launcher_command(plan, env)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"note: {note}")
    os.makedirs(plan.save_dir, exist_ok=True)
    print("launching: " + " ".join(cmd), flush=True)
    status = run(cmd, env)
    if status < 0:  # die of the same signal, as the launcher did
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


def rank_command(size: str, argv: list[str]) -> list[str]:
    """The command a rank runs: this interpreter, pretrain_cola.py, the resolved flags."""
    return [sys.executable, "-u", str(ENTRY), *resolve(size, argv).flags]


def run_rank(size: str) -> NoReturn:
    """The Python half of a size script (``deepspeed examples/pretrain_cola_<size>.sh``): become
    pretrain_cola.py with the size's resolved flags, keeping this process's PID."""
    try:
        cmd = rank_command(size, sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # torchrun's default: one thread per rank unless asked.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
