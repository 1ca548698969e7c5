#!/usr/bin/env bash
# Sourced by every launcher in examples/ (common.sh, slurm/*.sbatch, mpi/*.sh, quickstart.sh): one way to
# find the repository, the Python environment and a master port, and the switches they share.
#
#   REPO_DIR     the checkout (this file's ../); the sbatch script finds it before sourcing this file
#   PYTHON       the interpreter; default: $REPO_DIR/.venv/bin/python when it exists, else python3 on PATH.
#                With the venv, $REPO_DIR/.venv/bin is also put first on PATH, so deepspeed, torchrun and
#                the ranks all come from the same environment whichever launcher starts them.
#   MASTER_PORT  when unset on a single node: a free port (other jobs may hold 29500); multi-node: 29500
#   EXIT_SIGNAL_HANDLER [1]  1: --exit-signal-handler (SIGTERM/SIGUSR1: every rank saves and exits 0);
#                            0: --no-exit-signal-handler (a signal stops the ranks at once)

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export REPO_DIR

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
    PYTHON="$REPO_DIR/.venv/bin/python"
    PATH="$REPO_DIR/.venv/bin:$PATH"
    export PATH
  else
    PYTHON="$(command -v python3 || command -v python || true)"
    if [[ -z "$PYTHON" ]]; then
      echo "no Python found: run 'make setup' in $REPO_DIR (creates .venv) or put python3 on PATH" >&2
      exit 2
    fi
  fi
fi
export PYTHON

# The switch for Megatron's --exit-signal-handler in pretrain_cola.py (on by default there too): SIGTERM
# (scancel, preemption) and SIGUSR1 (#SBATCH --signal ahead of the time limit) make every rank save at the
# next step boundary and exit 0. 0 passes --no-exit-signal-handler, and the sbatch script then requeues
# at once on SIGUSR1 instead of waiting for the ranks to save.
EXIT_SIGNAL_HANDLER="${EXIT_SIGNAL_HANDLER:-1}"

# cola_free_port: print a TCP port nobody listens on now (for a single-node rendezvous).
cola_free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
