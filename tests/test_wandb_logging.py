"""Weights & Biases logging (``--wandb-project``): an offline run holds every TensorBoard scalar at the
same step, read back from the run's ``.wandb`` file; and the flags' errors."""

from __future__ import annotations

import glob
import json
import struct
import sys

import pytest

from megatron_cola.training.arguments import ArgumentError, build_train_config, parse_args

from .conftest import free_port, synthetic_args

_BLOCK = 32768  # the LevelDB log block size of wandb's transaction log


def read_wandb_records(path: str) -> list:
    """The ``Record`` protos of a ``run-*.wandb`` transaction log (a ``:W&B`` header, then LevelDB log
    records: crc32 ``I``, length ``H``, type ``B`` = full 1 / first 2 / middle 3 / last 4, in 32 KiB
    blocks whose tails shorter than a header are padding)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), (ident, magic)
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = payload
        elif kind in (3, 4):
            pending += payload
        else:
            raise AssertionError(f"{path}: record type {kind} at byte {pos}")
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_history(run_dir: str) -> list[dict]:
    """The history rows (``run.log`` calls, merged per step) of an offline run directory."""
    (path,) = glob.glob(f"{run_dir}/run-*.wandb")
    rows = []
    for record in read_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def tensorboard_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(directory, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_offline_run_holds_every_tensorboard_scalar(synthetic_prefix: str, tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    from megatron_cola.training.pretrain import pretrain

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # a single in-process rank; the variables pretrain() sets are restored afterwards
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    tb, wb = tmp_path / "tb", tmp_path / "wb"
    argv = synthetic_args(
        synthetic_prefix, "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2"
    )
    argv[argv.index("--global-batch-size") + 1] = "4"
    argv += ["--tensorboard-dir", str(tb), "--wandb-project", "cola-test", "--wandb-exp-name", "tiny"]
    argv += ["--wandb-save-dir", str(wb)]
    pretrain(argv)

    (run_dir,) = glob.glob(f"{wb}/wandb/offline-run-*")
    rows = wandb_history(run_dir)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4]
    by_step = {row["_step"]: row for row in rows}
    scalars = tensorboard_scalars(str(tb))
    # train, throughput, validation and test records, each field and each loss vs tokens
    assert {"train/lm_loss", "train/grad_norm", "throughput/tokens_per_second", "validation/lm_loss"} <= set(
        scalars
    )
    assert {"test/ppl", "train/lm_loss vs tokens", "validation/lm_loss vs tokens"} <= set(scalars)
    checked = 0
    for tag, points in scalars.items():
        for step, value in points:
            if tag.endswith(" vs tokens"):  # TensorBoard steps these by tokens; W&B by its step metric
                matches = [r[tag] for r in rows if tag in r and r["consumed_tokens"] == step]
            else:
                matches = [by_step[step][tag]] if tag in by_step.get(step, {}) else []
            assert len(matches) == 1, (tag, step)
            assert float(matches[0]) == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)
            checked += 1
    # and nothing in W&B that TensorBoard did not get
    logged = sum(1 for row in rows for key in row if not key.startswith("_") and key != "consumed_tokens")
    assert logged == checked > 50


def test_wandb_flag_errors(synthetic_prefix: str, monkeypatch) -> None:
    def config(*extra: str):
        return build_train_config(
            parse_args(synthetic_args(synthetic_prefix, "--train-iters", "2", *extra)), world_size=1
        )

    with pytest.raises(ArgumentError, match="--wandb-exp-name is given without --wandb-project"):
        config("--wandb-exp-name", "run1")
    with pytest.raises(ArgumentError, match="--wandb-save-dir DIR or --save DIR"):
        config("--wandb-project", "p")
    assert config("--wandb-project", "p", "--save", "ckpt").wandb_project == "p"
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    with pytest.raises(ArgumentError, match="needs the wandb package"):
        config("--wandb-project", "p", "--save", "ckpt")
