"""``TrainConfig`` built once from the flags (the deferred step metrics: ``tests/test_metrics.py``)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_cola.training.arguments import ArgumentError, build_parser, build_train_config, parse_args
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
