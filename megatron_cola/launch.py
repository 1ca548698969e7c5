"""Per-rank entry of ``deepspeed examples/pretrain_cola_<size>.sh``.

The deepspeed launcher runs its script with python on every rank (``python -u SCRIPT --local_rank=R ...``).
The size scripts are bash and Python at once; as Python they call :func:`run_rank`, which asks the same
script, run by bash with ``LAUNCHER=args``, for pretrain_cola.py's flags (the recipe lives only in the
bash scripts and ``examples/common.sh``) and then replaces this process with ``pretrain_cola.py`` and
those flags, so the rank keeps its PID and receives the launcher's signals itself.

DeepSpeed's runner forwards no signal to launch.py on a single node: killed alone (``kill``,
``timeout --foreground``, Ctrl-C from another shell) it leaves launch.py and the ranks running. The rank
notices its launch.py orphaned and acts as if it got SIGTERM (``training/watchdog.py``): it saves at the
next step boundary and exits 0, and launch.py exits with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from megatron_cola.errors import ConfigError

REPO_DIR = Path(__file__).resolve().parents[1]
ENTRY = REPO_DIR / "pretrain_cola.py"


def resolve_recipe(script: str | os.PathLike[str], extra: list[str]) -> list[str]:
    """pretrain_cola.py's flags for ``script`` (a size script) in this environment, ``extra`` appended.

    Runs ``bash SCRIPT EXTRA...`` with ``LAUNCHER=args``: common.sh prints the flags NUL-separated
    instead of starting anything. Raises ConfigError with the script's message when it fails (for
    example DATA_PATH unset).
    """
    env = {**os.environ, "LAUNCHER": "args"}
    proc = subprocess.run(["bash", os.fspath(script), *extra], env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise ConfigError(f"{script} could not resolve its recipe (exit {proc.returncode}): {message}")
    words = proc.stdout.split(b"\0")
    if not words or words[-1] != b"":
        raise ConfigError(
            f"{script} printed no NUL-terminated flags under LAUNCHER=args; is it a size script?"
        )
    return [w.decode() for w in words[:-1]]


def rank_command(script: str | os.PathLike[str], argv: list[str]) -> list[str]:
    """The command a rank runs: this interpreter, pretrain_cola.py, the recipe, then ``argv``."""
    return [sys.executable, "-u", str(ENTRY), *resolve_recipe(script, argv)]


def run_rank(script: str) -> NoReturn:
    """Entry point of a size script run as Python: become pretrain_cola.py with the script's recipe."""
    try:
        cmd = rank_command(script, sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # torchrun's default: one thread per rank unless asked (bash launches get it from common.sh).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
