"""CUDA-path defects shown on a CPU: the MFU peak table, the throughput window around evaluations,
the GPU a rank picks under MPI, DeepSpeed's accelerator under ``--device cpu`` and the optimizer named."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from megatron_cola.training.logging_utils import (
    PEAK_BF16_TFLOPS,
    StepTimer,
    format_train_line,
    peak_tflops,
    peak_tflops_for_name,
)
from megatron_cola.training.pretrain import LOCAL_RANK_VARIABLES, local_rank_from_env

from .conftest import ROOT, dist_env, synthetic_args


# ---------------------------------------------------------------------------------------- peak FLOPs
@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),  # not an A10: no guess
        ("NVIDIA GeForce RTX 4090", None),
        ("H100", None),  # a fragment is not a product name
    ],
)
def test_peak_tflops_by_exact_product_name(name: str, peak: float | None) -> None:
    assert peak_tflops_for_name(name) == peak


def test_peak_tflops_override_and_cpu() -> None:
    assert all(v > 0 for v in PEAK_BF16_TFLOPS.values())
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0  # --peak-tflops wins everywhere


def test_train_line_names_the_peak_and_gib() -> None:
    metrics = {
        "iteration": 10, "train_iters": 20, "consumed_samples": 40, "consumed_tokens": 4000,
        "step_time_ms": 12.0, "lr": 1e-3, "global_batch_size": 4, "lm_loss": 3.0, "grad_norm": 1.0,
        "tokens_per_second": 1e5, "tflops_per_device": 400.0, "mfu": 400 / 989, "peak_tflops": 989.0,
        "peak_memory_gb": 1.5,
    }  # fmt: skip
    line = format_train_line(metrics)
    assert "| MFU: 40.4% of 989 TFLOP/s |" in line
    assert "| peak memory (GiB): 1.50 |" in line


# ---------------------------------------------------------------------------------- throughput window
def test_step_timer_keeps_the_steps_before_an_evaluation() -> None:
    """The trainer's loop with --log-interval 4 and --eval-interval 3: the window 1-4 holds an
    evaluation after step 3, the window 5-8 one after step 6. Each window's time per step must be the
    steps' own: at least their measured durations (the old meter restarted at the evaluation and kept
    only the steps after it: 1/4 and 2/4 of the time), and without the evaluation's time."""
    step, evaluation, log_interval, eval_interval = 0.02, 0.12, 4, 3
    timer = StepTimer(torch.device("cpu"))
    durations, windows = [], []
    for it in range(1, 9):
        t0 = time.perf_counter()
        time.sleep(step)  # a training step
        durations.append(time.perf_counter() - t0)
        timer.step()
        if it % log_interval == 0:
            steps, seconds = timer.take()
            assert steps == log_interval
            windows.append((seconds, sum(durations[-log_interval:])))
        if it % eval_interval == 0:
            with timer.paused():
                time.sleep(evaluation)
    assert len(windows) == 2
    for seconds, steps_own in windows:
        assert steps_own <= seconds < steps_own + evaluation / 2, windows


def test_step_timer_nested_pause_and_empty_window() -> None:
    timer = StepTimer(torch.device("cpu"))
    with timer.paused(), timer.paused():
        time.sleep(0.05)
    steps, seconds = timer.take()
    assert steps == 0 and seconds < 0.05


# ------------------------------------------------------------------------------------------ local rank
@pytest.mark.parametrize("name", LOCAL_RANK_VARIABLES)
def test_local_rank_from_each_launcher_variable(name: str) -> None:
    assert local_rank_from_env({name: "3", "PMI_RANK": "11"}) == 3


def test_local_rank_order_and_default() -> None:
    assert local_rank_from_env({}) == 0
    assert local_rank_from_env({"PMI_RANK": "5", "PMI_SIZE": "8"}) == 0  # a global rank is not local
    # MPICH/Intel MPI (Hydra) export MPI_LOCALRANKID; srun inside the job adds SLURM_LOCALID.
    assert local_rank_from_env({"MPI_LOCALRANKID": "2", "SLURM_LOCALID": "0"}) == 2
    assert local_rank_from_env({"LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}) == 1
    from megatron_cola.errors import ConfigError

    with pytest.raises(ConfigError, match="MPI_LOCALRANKID='x'"):
        local_rank_from_env({"MPI_LOCALRANKID": "x"})


# ------------------------------------------------------------------------------ DeepSpeed accelerator
_ACCELERATOR_PROBE = """
import sys
import megatron_cola.training.pretrain, megatron_cola.training.trainer, megatron_cola.training.engine
assert "deepspeed" not in sys.modules, "a megatron_cola import pulled DeepSpeed in before --device is known"
from megatron_cola.training.engine import use_deepspeed_accelerator
import os
print(use_deepspeed_accelerator(sys.argv[1]), os.environ["DS_ACCELERATOR"])
from deepspeed.accelerator import get_accelerator
print(get_accelerator()._name)
if sys.argv[1] == "cpu":  # already imported and picked: replaced
    import deepspeed.accelerator.real_accelerator as real
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    real.set_accelerator(CUDA_Accelerator())
    use_deepspeed_accelerator("cpu")
    print(get_accelerator()._name)
"""


def test_deepspeed_accelerator_follows_device() -> None:
    """A GPU box: DeepSpeed would pick cuda (here: DS_ACCELERATOR=cuda in the environment, as its
    auto-detection would). ``--device cpu`` must give it the CPU accelerator before it is imported."""
    env = {**dist_env(), "DS_ACCELERATOR": "cuda"}
    proc = subprocess.run(
        [sys.executable, "-c", _ACCELERATOR_PROBE, "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["cpu", "cpu", "cpu", "cpu"]


def test_cpu_run_on_a_gpu_box_trains_and_names_its_optimizer(synthetic_prefix: str, tmp_path) -> None:
    """``pretrain_cola.py --device cpu`` where DeepSpeed would choose cuda; one process, a log interval
    (2) that does not divide the eval interval (3), and --peak-tflops for an MFU on the CPU. The start-up
    lines a newcomer waits for come before the first iteration, which is logged at once."""
    tb = tmp_path / "tb"
    args = synthetic_args(
        synthetic_prefix, "--train-iters", "6", "--device", "cpu", "--tensorboard-dir", str(tb)
    )
    args += ["--log-interval", "2", "--eval-interval", "3", "--peak-tflops", "2"]
    env = {**dist_env(), "DS_ACCELERATOR": "cuda"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_cola.py"), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "> optimizer: torch AdamW (fused)\n" in proc.stdout
    assert "> MFU against a peak of 2 TFLOP/s per device (--peak-tflops)" in proc.stdout
    assert proc.stdout.count("% of 2 TFLOP/s | peak memory (GiB): ") == 4  # iteration 1 at once, then 2, 4, 6
    rows = [json.loads(x) for x in (tb / "metrics.jsonl").read_text().splitlines()]
    throughput = [r for r in rows if r["kind"] == "throughput"]
    assert [r["iteration"] for r in throughput] == [1, 2, 4, 6]
    assert [r["iteration"] for r in rows if r["kind"] == "validation"] == [3, 6]
    for r in throughput:
        assert r["optimizer"] == "torch AdamW (fused)" and r["peak_tflops"] == 2.0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 2.0)
        assert 0 < r["elapsed_seconds"] and r["eta_seconds"] >= 0
    assert throughput[-1]["eta_seconds"] == 0.0
    out = proc.stdout
    summary = out.index("> train split: 540 documents, ")
    assert (
        summary
        < out.index("> validation split: 30 documents, ")
        < out.index("> time to initialize (seconds): ")
    )
    assert out.index("> time to initialize (seconds): ") < out.index(" iteration        1/       6 |")
    assert " | elapsed: 0:00:0" in out and " | ETA: 0:00:0" in out


# ------------------------------------------------------------------------------------------ bench_train
@pytest.mark.parametrize("order", ["sequential", "interleaved"])
def test_bench_train_records_optimizer_peak_and_device(tmp_path, order: str) -> None:
    from megatron_cola.cli import bench_train

    out = tmp_path / "bench.json"
    flags = ["--model-size", "debug", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2"]
    flags += ["--steps", "1", "--rounds", "2", "--warmup", "1", "--device", "cpu", "--peak-tflops", "1.5"]
    bench_train.main([*flags, "--variants", "full-rank", "cola", "--order", order, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["order"] == order and result["config"]["device_name"] == "cpu"
    assert [r["variant"] for r in result["rows"]] == ["full-rank", "cola"]
    for row in result["rows"]:
        assert row["optimizer"] == "torch AdamW (fused)" and row["device_name"] == "cpu"
        assert row["peak_tflops"] == 1.5 and row["mfu"] == pytest.approx(row["tflops"] / 1.5)
        assert row["peak_gib"] is None  # CPU: no allocator peak
