"""``TrainConfig`` built once from the flags, and ``StepLog``'s deferred metrics against per-step ones."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_cola.parallel import ParallelState
from megatron_cola.training.arguments import ArgumentError, build_parser, build_train_config, parse_args
from megatron_cola.training.logging_utils import MetricsWriter
from megatron_cola.training.step_log import StepLog
from megatron_cola.training.train_config import TrainConfig

from .conftest import synthetic_args


def test_config_is_frozen_and_namespace_untouched(synthetic_prefix: str) -> None:
    ns = parse_args(synthetic_args(synthetic_prefix, "--train-tokens", "10000"))
    before = dict(vars(ns))
    cfg = build_train_config(ns, 2)
    assert vars(ns) == before  # validation does not fill in the Namespace
    assert isinstance(cfg, TrainConfig) and cfg.train_iters == 10 and cfg.gradient_accumulation_steps == 2
    assert cfg.min_lr == pytest.approx(0.1 * cfg.lr) and cfg.zero_stage == 1 and cfg.clip_grad == 0.5
    assert isinstance(cfg.data_path, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train_iters = 3  # type: ignore[misc]


def test_every_flag_is_a_config_field() -> None:
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    derived = {"world_size", "data_parallel_size", "gradient_accumulation_steps", "user_ds_config"}
    not_kept = {"config", "fp16", "deepspeed", "local_rank"}  # AcceptedFlags: parsed, not kept
    assert set(TrainConfig.field_names()) == (dests - not_kept) | derived


def test_model_checks_are_owned_by_model_args(synthetic_prefix: str) -> None:
    """CoLA-M with --full-rank is refused by ModelArgs' own check, reported with the flags to change."""
    argv = synthetic_args(synthetic_prefix, "--train-iters", "2", "--full-rank", "--recompute", "cola-m")
    with pytest.raises(ArgumentError, match=r"--full-rank.*needs a CoLA model"):
        build_train_config(parse_args(argv), 1)


class _HostReads(TorchFunctionMode):
    """Counts the tensor methods that copy a value to the host."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_step_log_defers_and_matches_per_step_values(tmp_path) -> None:
    writer = MetricsWriter(str(tmp_path), enabled=True)
    log = StepLog(ParallelState.single(), writer)
    gen = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=gen) * 10 for _ in range(5)]
    norms = [torch.rand((), generator=gen) for _ in range(5)]
    with _HostReads() as reads:
        for i, (loss, norm) in enumerate(zip(losses, norms), start=1):
            log.add(i, 64 * i, loss, 1e-3 * i, norm)
    assert reads.calls == []  # queuing a step never reads a value on the host
    path = tmp_path / "metrics.jsonl"
    assert path.read_text() == ""  # nothing written between log intervals
    logged = log.flush()
    assert logged == [(i, float(loss)) for i, loss in enumerate(losses, start=1)]  # bitwise, per step
    records = [json.loads(line) for line in path.read_text().splitlines()]
    expected = [
        {
            "kind": "train",
            "iteration": i,
            "consumed_tokens": 64 * i,
            "lm_loss": float(loss),
            "lr": 1e-3 * i,
            "grad_norm": float(norm),
            "skipped": False,
        }
        for i, (loss, norm) in enumerate(zip(losses, norms), start=1)
    ]
    assert records == expected
    assert log.last_grad_norm == float(norms[-1]) and log.flush() == []
    writer.close()
