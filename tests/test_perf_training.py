"""Issue 10 in pre-training: ``--compile``, ``--grouped-projections`` and ``--chunked-loss`` train on CPU
(gloo, 2 processes) with the same losses as eager training, under every recompute mode, TP and ZeRO
0-3; checkpoints saved without them resume with them; ZeRO-3 partitions the model as it is built and
still gives the seeded model of every other layout; ``benchmarks/gpu_suite.sh --smoke`` works."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from megatron_cola.training.arguments import ArgumentError, model_args_from

from .conftest import ROOT, dist_env, run_torchrun, synthetic_args
from .test_training import args_for, train_losses


# ---------------------------------------------------------------------------------------------- flags
def test_performance_flags_reach_the_model(synthetic_prefix: str) -> None:
    cfg = args_for(synthetic_prefix, "--compile", "--grouped-projections", "--chunked-loss")
    assert cfg.compile and cfg.grouped_projections and cfg.chunked_loss
    margs = model_args_from(cfg, 256)
    assert margs.grouped_projections and margs.chunked_loss
    plain = args_for(synthetic_prefix)
    assert not (plain.compile or plain.grouped_projections or plain.chunked_loss)
    assert not model_args_from(plain, 256).grouped_projections
    assert cfg.compile_mode == plain.compile_mode == "default"
    graphs = args_for(synthetic_prefix, "--compile", "--compile-mode", "reduce-overhead")
    assert graphs.compile_mode == "reduce-overhead"


def test_compile_mode_needs_compile_and_a_known_mode(synthetic_prefix: str) -> None:
    with pytest.raises(ArgumentError, match="--compile-mode max-autotune needs --compile"):
        args_for(synthetic_prefix, "--compile-mode", "max-autotune")
    from megatron_cola.config import ModelArgs
    from megatron_cola.model import build_model
    from megatron_cola.model.compile import compile_blocks

    with pytest.raises(ValueError, match="compile mode 'fast': expected one of default, reduce-overhead"):
        compile_blocks(build_model(ModelArgs.from_size("debug", num_layers=1, vocab_size=64)), mode="fast")


def test_chunked_loss_refused_under_tensor_parallelism(synthetic_prefix: str) -> None:
    with pytest.raises(ArgumentError, match="--chunked-loss works on one tensor-parallel rank"):
        args_for(synthetic_prefix, "--chunked-loss", "--tensor-model-parallel-size", "2")


# ---------------------------------------------------------------------------------------------- runs
def _losses(prefix: str, tmp_path, name: str, *extra: str) -> dict[int, float]:
    tb = tmp_path / name
    proc = run_torchrun(
        synthetic_args(prefix, "--train-iters", "3", "--bf16", "--tensorboard-dir", str(tb), *extra)
    )
    if "--compile" in extra:
        assert "compiled 2 decoder blocks" in proc.stdout
    return train_losses(tb)


@pytest.mark.slow
def test_compiled_training_matches_eager(synthetic_prefix: str, tmp_path) -> None:
    """bf16, 3 steps: compiled runs (with grouped projections, each recompute mode, TP=2, ZeRO 0-3)
    give the eager run's losses within bf16 tolerance."""
    tp2 = ("--tensor-model-parallel-size", "2")
    eager = {
        "dp2": _losses(synthetic_prefix, tmp_path, "eager-dp2", "--zero-stage", "1"),
        "tp2": _losses(synthetic_prefix, tmp_path, "eager-tp2", "--zero-stage", "0", *tp2),
    }
    runs = {
        "zero1-grouped-chunked": ("dp2", "--zero-stage", "1", "--grouped-projections", "--chunked-loss"),
        "zero3-cola-m": ("dp2", "--zero-stage", "3", "--recompute", "cola-m"),
        "tp2-full": ("tp2", "--zero-stage", "0", *tp2, "--recompute", "full"),
    }
    for name, (layout, *extra) in runs.items():
        compiled = _losses(synthetic_prefix, tmp_path, name, "--compile", *extra)
        assert sorted(compiled) == [1, 2, 3], name
        for it in (1, 2, 3):
            assert compiled[it] == pytest.approx(eager[layout][it], abs=2e-2), (name, it)


@pytest.mark.slow
def test_resume_without_flags_into_compiled_grouped_run(synthetic_prefix: str, tmp_path) -> None:
    common = synthetic_args(synthetic_prefix, "--train-iters", "4", "--zero-stage", "2")
    ckpt = tmp_path / "ckpt"
    run_torchrun([*common, "--save", str(ckpt), "--exit-interval", "2"])
    second = run_torchrun(
        [*common, "--load", str(ckpt), "--tensorboard-dir", str(tmp_path / "tb"), "--compile"]
        + ["--grouped-projections", "--chunked-loss"]
    )
    assert "resumed from" in second.stdout and "compiled 2 decoder blocks" in second.stdout
    assert sorted(train_losses(tmp_path / "tb")) == [3, 4]


# ------------------------------------------------------------------------------------ ZeRO-3 start-up
def _zero3_build_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    try:
        import deepspeed

        from megatron_cola.config import ModelArgs
        from megatron_cola.model import build_model as plain_build
        from megatron_cola.parallel import ParallelState
        from megatron_cola.training.engine import build_parallel_model

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        args = ModelArgs.from_size("debug", num_layers=2, vocab_size=256)
        parallel = ParallelState.from_torch_distributed(1)
        config = {
            "train_batch_size": 2,
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
        }
        model = build_parallel_model(7, args, parallel, torch.device("cpu"), zero3_config=config)
        reference = dict(plain_build(args, seed=7).named_parameters())
        for name, p in model.named_parameters():
            # Each rank holds only its partition of every parameter ...
            assert hasattr(p, "ds_id") and p.ds_tensor.numel() <= -(-p.ds_numel // world), name
            assert p.numel() == 0, name
            # ... and the gathered parameter is the seeded full weight any other layout starts from.
            with deepspeed.zero.GatheredParameters([p]):
                assert torch.equal(p.data, reference[name].data), name
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
        torch.distributed.barrier()
    except Exception:
        with open(os.path.join(out_dir, f"err{rank}"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        # a gloo process group left alive aborts the interpreter at exit now and then
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_zero3_builds_partitioned_seeded_model(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    mp.spawn(_zero3_build_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    errors = [(tmp_path / f"err{r}").read_text() for r in range(2) if (tmp_path / f"err{r}").exists()]
    assert not errors, errors[0]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


# ------------------------------------------------------------------------------------------ GPU suite
def _suite(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**dist_env(), "PYTHON": sys.executable}
    env.pop("OUT", None)
    cmd = [
        "bash",
        str(ROOT / "benchmarks" / "gpu_suite.sh"),
        "--smoke",
        "--wheelhouse",
        str(tmp_path / "none"),
    ]
    return subprocess.run([*cmd, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_gpu_suite_smoke(tmp_path) -> None:
    """The suite's script on CPU: a foreign non-empty --out is refused; every step runs in its own
    process and suite.json / suite.md hold one row per variant and the target ratios; a rerun into the
    same --out empties it first, and with a budget too small for any step still prints its table, which
    then holds no row of the earlier run."""
    out = tmp_path / "suite"
    out.mkdir()
    (out / "notes.txt").write_text("not the suite's")
    refused = _suite(tmp_path, "--out", str(out))
    assert refused.returncode == 2 and "is not empty and not an earlier suite's output" in refused.stderr
    (out / "notes.txt").unlink()

    proc = _suite(tmp_path, "--out", str(out), "--target", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "suite.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [
        "headline_full_rank", "headline_cola", "cola_m", "data", "pretrain_deepspeed",
        "cola_mode_reduce-overhead",
    ]  # fmt: skip
    assert [s["status"] for s in summary["steps"]] == ["ok"] * 6, summary["steps"]
    rows = {r["step"]: r for r in summary["rows"]}
    assert sorted(rows) == sorted(s["step"] for s in summary["steps"] if s["step"] != "data")
    assert rows["headline_cola"]["variant"] == "debug cola+grouped"
    assert rows["cola_m"]["variant"] == "debug cola:cola-m+grouped"
    assert all(r["tokens_per_s"] > 0 and r["optimizer"] and r["device"] == "cpu" for r in rows.values())
    assert "--no-exit-signal-handler" in proc.stdout  # a timeout ends the training at once
    ratio = summary["targets"][0]
    assert ratio["what"] == "CoLA / full-rank tokens/s"
    assert ratio["value"] == pytest.approx(
        rows["headline_cola"]["tokens_per_s"] / rows["headline_full_rank"]["tokens_per_s"]
    )
    table = (out / "suite.md").read_text()
    assert "| headline_cola | debug cola+grouped | eager | 2 |" in table
    assert "| pretrain_deepspeed | pretrain_cola.py iteration 2 | eager |" in table
    assert table in proc.stdout

    again = _suite(tmp_path, "--out", str(out), "--budget", "1")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"emptying {out}" in again.stdout
    summary = json.loads((out / "suite.json").read_text())
    assert summary["rows"] == [] and not (out / "headline_cola.json").exists()
    assert all(s["status"].startswith("skipped (deadline") for s in summary["steps"]), summary["steps"]
    assert (out / "suite.md").read_text() in again.stdout


@pytest.mark.slow
def test_zero3_under_tensor_parallelism_starts_from_the_same_model(synthetic_prefix: str, tmp_path) -> None:
    """TP=2: ZeRO-3 partitions over the data-parallel group only, so each TP rank keeps its own shard
    and the first loss (fp32, initial weights) equals ZeRO-0's."""
    first = {}
    for stage in ("0", "3"):
        tb = tmp_path / f"z{stage}"
        run_torchrun(
            synthetic_args(synthetic_prefix, "--train-iters", "2", "--tensorboard-dir", str(tb))
            + ["--zero-stage", stage, "--tensor-model-parallel-size", "2"]
        )
        first[stage] = train_losses(tb)[1]
    assert first["3"] == pytest.approx(first["0"], rel=1e-6)
