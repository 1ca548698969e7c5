"""In one process, without a launcher: ``TrainingMetrics`` (the step queue, the log window, the line and
its records, elapsed and ETA), the dataset summary, and ``RunGuard`` with ``GuardedOptimizer`` on real
DeepSpeed engines (ZeRO 0-3, fp32 and bf16): a non-finite step leaves the weights, the optimizer state
and the LR schedule as they were, and too many in a row stop the run."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_cola.errors import TrainingError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
from megatron_cola.training.logging_utils import MetricsWriter, format_duration
from megatron_cola.training.metrics import TrainingMetrics

from .conftest import free_port, synthetic_args


def config(prefix: str, *extra: str):
    return build_train_config(parse_args(synthetic_args(prefix, *extra)), world_size=1)


def metrics_for(cfg, directory) -> TrainingMetrics:
    model_args = model_args_from(cfg, 256)
    writer = MetricsWriter(str(directory), enabled=True)
    return TrainingMetrics(
        cfg, model_args, ParallelState.single(), torch.device("cpu"), writer, "torch AdamW"
    )


def jsonl(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


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


# -------------------------------------------------------------------------------------------- metrics
def test_steps_stay_on_the_device_and_flush_matches_per_step_values(synthetic_prefix: str, tmp_path) -> None:
    metrics = metrics_for(config(synthetic_prefix, "--train-iters", "8"), tmp_path)
    gen = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=gen) * 10 for _ in range(5)]
    norms = [torch.rand((), generator=gen) for _ in range(5)]
    with _HostReads() as reads:
        for i, (loss, norm) in enumerate(zip(losses, norms), start=1):
            metrics.record_step(i, 64 * i, loss, 1e-3 * i, norm, skipped=i == 4)
    assert reads.calls == []  # queuing a step never reads a value on the host
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # nothing written between log intervals
    expected = [
        {
            "iteration": i,
            "consumed_tokens": 64 * i,
            "lm_loss": float(loss),  # bitwise, per step
            "lr": 1e-3 * i,
            "grad_norm": float(norm),
            "skipped": i == 4,
        }
        for i, (loss, norm) in enumerate(zip(losses, norms), start=1)
    ]
    assert metrics.flush() == expected and metrics.flush() == []
    assert jsonl(tmp_path) == [{"kind": "train", **r} for r in expected]
    assert metrics.last_grad_norm == float(norms[-1])
    assert metrics.window_skips == metrics.total_skips == 1
    metrics.close()


def test_log_line_averages_the_window_and_adds_elapsed_and_eta(
    synthetic_prefix: str, tmp_path, capsys
) -> None:
    metrics = metrics_for(config(synthetic_prefix, "--train-iters", "8"), tmp_path)
    metrics.start(0)
    for i, value in enumerate([4.0, 2.0, 6.0, 8.0], start=1):
        time.sleep(0.01)
        metrics.record_step(i, 64 * 16 * i, torch.tensor(value), 1e-3, torch.tensor(0.5), skipped=i == 2)
    with metrics.paused():
        time.sleep(0.05)  # an evaluation: wall-clock time, not training time
    record = metrics.log(4, 64, 1e-3)
    line = capsys.readouterr().out.splitlines()[-1]
    assert record["lm_loss"] == 5.0 and record["grad_norm"] == 0.5 and record["skipped_iterations"] == 1
    assert 0.04 <= record["step_time_ms"] / 1000 * 4 < record["elapsed_seconds"]  # pauses are elapsed
    assert record["eta_seconds"] == pytest.approx(record["elapsed_seconds"])  # 4 done, 4 to go
    assert line.startswith(" iteration        4/       8 | consumed samples:           64 |")
    assert "| lm loss: 5.000000E+00 | grad norm: 0.5000 |" in line
    assert line.endswith("| number of skipped iterations:   1 | elapsed: 0:00:00 | ETA: 0:00:00 |")
    # the next window starts empty; the throughput record carries the new keys, not train_iters
    metrics.record_step(5, 64 * 16 * 5, torch.tensor(1.0), 1e-3, None)
    second = metrics.log(5, 80, 1e-3)
    assert second["lm_loss"] == 1.0 and second["skipped_iterations"] == 0 and second["grad_norm"] is None
    assert second["eta_seconds"] == pytest.approx(second["elapsed_seconds"] / 5 * 3)
    rows = [r for r in jsonl(tmp_path) if r["kind"] == "throughput"]
    assert [r["iteration"] for r in rows] == [4, 5]
    assert {"elapsed_seconds", "eta_seconds", "step_time_ms", "mfu"} <= set(rows[0])
    assert "train_iters" not in rows[0]
    metrics.close()


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0:00:00"), (59.6, "0:01:00"), (3599, "0:59:59"), (100000, "27:46:40"), (-3, "0:00:00")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_dataset_summary_per_split(synthetic_prefix: str, tmp_path) -> None:
    from megatron_cola.data import build_train_valid_test_datasets
    from megatron_cola.training.data_setup import describe_datasets

    cache = str(tmp_path / "cache")
    train, valid, test = build_train_valid_test_datasets(
        [synthetic_prefix], "90,5,5", 64, (2000, 10, 0), 1234, cache
    )
    lines = describe_datasets(train, valid, test)
    assert test is None and len(lines) == 2
    assert lines[0] == f"> train split: 540 documents, {len(train)} samples, 3 epochs"
    assert lines[1] == f"> validation split: 30 documents, {len(valid)} samples, 1 epoch"
    assert len(train) >= 2000
    blended = build_train_valid_test_datasets(
        ["1", synthetic_prefix, "1", synthetic_prefix], "90,5,5", 64, (100, 0, 0), 1234, cache
    )[0]
    (line,) = describe_datasets(blended, None, None)
    assert line == f"> train split (2 datasets blended): 1080 documents, {len(blended)} samples, 1 epoch"


# ---------------------------------------------------------------------------------------------- guard
@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group, as ``pretrain`` makes it, torn down afterwards."""
    import torch.distributed as dist

    from megatron_cola.training.engine import use_deepspeed_accelerator

    with pytest.MonkeyPatch.context() as mp:
        env = dict(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
        for key, value in env.items():
            mp.setenv(key, value)
        use_deepspeed_accelerator("cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        yield ParallelState.from_torch_distributed(1)
        dist.destroy_process_group()


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj.detach().clone()]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _state(engine, scheduler) -> tuple[list[torch.Tensor], list[float], int]:
    """Every weight (a ZeRO-3 rank's partition), every optimizer-state tensor, the LR and its step."""
    weights = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    return weights + _tensors(engine.optimizer.state_dict()), scheduler.get_last_lr(), scheduler.last_epoch


@pytest.mark.parametrize("zero, precision", [("0", []), ("1", []), ("2", ["--bf16"]), ("3", [])])
def test_guard_skips_non_finite_steps_without_touching_the_state(
    one_rank: ParallelState, synthetic_prefix: str, tmp_path, zero: str, precision: list[str], capsys
) -> None:
    from megatron_cola.training.ds_config import build_ds_config
    from megatron_cola.training.engine import build_engine, build_parallel_model, optimizer_name
    from megatron_cola.training.guards import GuardedOptimizer, RunGuard

    flags = ["--train-iters", "8", "--zero-stage", zero, "--global-batch-size", "8", "--seq-length", "32"]
    cfg = config(
        synthetic_prefix, *flags, "--max-consecutive-skipped-iters", "2", "--device", "cpu", *precision
    )
    device, model_args = torch.device("cpu"), model_args_from(cfg, 256)
    ds_config = build_ds_config(cfg, device.type)
    zero3 = ds_config if zero == "3" else None
    model = build_parallel_model(cfg.seed, model_args, one_rank, device, zero3_config=zero3)
    engine, scheduler = build_engine(cfg, model, one_rank, device, ds_config)
    # the guard holds the step itself only where DeepSpeed steps the plain torch optimizer
    assert isinstance(engine.optimizer, GuardedOptimizer) == (zero == "0" and not precision)
    guard = RunGuard(cfg, engine, device, None, time.time())
    metrics = TrainingMetrics(
        cfg,
        model_args,
        one_rank,
        device,
        MetricsWriter(str(tmp_path), True),
        optimizer_name(scheduler.optimizer),
    )
    tokens = torch.randint(
        0, 250, (cfg.micro_batch_size, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0)
    )

    def step(iteration: int, poison: bool) -> bool:
        losses = []
        for micro in range(cfg.gradient_accumulation_steps):  # 2 micro-batches
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            if poison:
                loss = loss * math.nan
            engine.backward(loss)
            losses.append(loss.detach().float())
            if micro == cfg.gradient_accumulation_steps - 1:
                verdict = guard.before_step(losses)
            engine.step()
        skipped = guard.after_step(verdict, iteration)
        metrics.record_step(
            iteration, 0, torch.stack(losses).mean(), scheduler.get_last_lr()[0], None, skipped
        )
        if skipped:
            guard.check_skip_limit(iteration, metrics.total_skips)
        return skipped

    assert not step(1, poison=False)
    before = _state(engine, scheduler)
    assert step(2, poison=True) and not guard.save_allowed
    after = _state(engine, scheduler)
    assert after[1:] == before[1:]  # the LR schedule held
    assert len(after[0]) == len(before[0]) and all(torch.equal(a, b) for a, b in zip(after[0], before[0]))
    assert all(torch.isfinite(t).all() for t in after[0] if t.is_floating_point())
    assert not step(3, poison=False) and guard.save_allowed  # applied again
    assert not all(torch.equal(a, b) for a, b in zip(_state(engine, scheduler)[0], before[0]))
    assert scheduler.last_epoch == before[2] + 1
    assert step(4, poison=True)
    with pytest.raises(
        TrainingError, match=r"2 consecutive iterations \(up to 5\).*--max-consecutive-skipped-iters 2"
    ):
        step(5, poison=True)
    out = capsys.readouterr().out
    assert (
        "> iteration 5: non-finite loss or gradient norm, optimizer step skipped (2 in a row, 3 in total)"
        in out
    )
    records = metrics.flush()
    guard.check_logged(records)
    assert [r["skipped"] for r in records] == [False, True, False, True, True]
    assert "WARNING" not in capsys.readouterr().out  # skipped steps are not "applied with a NaN loss"
    metrics.close()


def test_guarded_optimizer_is_the_wrapped_optimizer_but_for_a_held_step() -> None:
    """Same parameter groups, state and state dict as the AdamW it wraps (checkpoints do not change);
    a held step leaves the weights and moments alone and says so in ``overflow``, once."""
    from megatron_cola.training.guards import GuardedOptimizer

    weight = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.AdamW([weight], lr=0.1)
    guarded = GuardedOptimizer(inner)
    assert guarded.param_groups is inner.param_groups and guarded.state is inner.state
    assert isinstance(guarded, torch.optim.Optimizer) and guarded.defaults is inner.defaults

    def step() -> None:
        weight.grad = torch.full((3,), 0.5)
        guarded.step()
        guarded.zero_grad()

    step()
    assert not guarded.overflow and weight.grad is None
    before = (weight.detach().clone(), {k: v.clone() for k, v in inner.state[weight].items()})
    guarded.hold_next_step()
    step()
    assert guarded.overflow and torch.equal(weight, before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in inner.state[weight].items())
    step()  # the hold was for one step only
    assert not guarded.overflow and not torch.equal(weight, before[0])
    assert guarded.state_dict() == inner.state_dict()
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    GuardedOptimizer(fresh).load_state_dict(inner.state_dict())
    assert fresh.state_dict()["state"][0]["step"] == inner.state_dict()["state"][0]["step"] == 2
