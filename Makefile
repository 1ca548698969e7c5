# Megatron-CoLA developer commands. Every target installs what it needs (idempotently) first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1

.PHONY: setup setup-mpi setup-slurm test test-fast lint quickstart compare

setup: $(STAMP)

# torch==2.13.0 is installed first (a local CPU wheel on our machines; on a GPU cluster install the
# CUDA build you want before running make). deepspeed and our C++ extension build against it without
# build isolation, so pip never pulls a second (CUDA) torch into a build environment.
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q setuptools wheel pybind11 ninja numpy
	$(PIP) install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The full suite, as CI runs it (every multi-process and end-to-end test); see docs/testing.md.
test: setup
	$(PY) -m pytest -q tests

# The development loop: units, in-process equivalences and one 2-process smoke run (tests/test_smoke.py);
# tests that start other processes are marked slow by tests/conftest.py and skipped. See docs/testing.md.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Pre-train the debug CoLA model on the bundled sample corpus (CPU, 2 processes); see examples/quickstart.sh.
quickstart: setup
	bash examples/quickstart.sh

# Train the debug CoLA model and its full-rank twin on the sample corpus for the same tokens, then draw
# loss vs tokens and vs training FLOPs and write a table (runs/compare/); see examples/compare.sh.
compare: setup
	bash examples/compare.sh

# Optional: Open MPI and mpi4py, for `mpirun` launches (examples/mpi) and their test. Needs apt (root).
setup-mpi: setup
	command -v mpirun >/dev/null || (apt-get update -q && apt-get install -y -q openmpi-bin libopenmpi-dev)
	$(PIP) install -q mpi4py

# Optional: Slurm 22.05 and munge from apt (root), for tests/test_slurm.py, which writes its own single-node
# slurm.conf for this host in a temporary directory and starts munged, slurmctld and slurmd itself.
setup-slurm: setup
	command -v slurmctld >/dev/null && command -v munged >/dev/null || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge)
