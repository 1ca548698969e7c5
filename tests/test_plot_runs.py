"""tools/plot_runs.py: run directories as the launchers write them, x = tokens / FLOPs / hours, the table."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_cola.cli.plot_runs import main, read_run
from megatron_cola.config import ModelArgs
from megatron_cola.model.flops import training_flops_per_token
from megatron_cola.training.logging_utils import MetricsWriter

pytest.importorskip("matplotlib")


def fake_run(run_dir, args: ModelArgs, flops: bool = True, checkpoint: bool = True) -> float:
    """A launcher-shaped run directory: ``tensorboard/metrics.jsonl`` written by the trainer's own writer
    (20 steps of 1024 tokens, log lines every 5 at 100 ms/step, validations at 10 and 20) and, when
    asked, a checkpoint whose model file records ``args``. Returns the FLOPs per token."""
    from megatron_cola.atomic_io import atomic_write_text
    from megatron_cola.checkpoint import iteration_tag, model_file_name, save_model_file

    fpt = training_flops_per_token(args, 64)
    writer = MetricsWriter(str(run_dir / "tensorboard"), enabled=True)
    for it in range(1, 21):
        rec = {"iteration": it, "consumed_tokens": 1024 * it, "lm_loss": 8.0 - 0.1 * it, "lr": 1e-3}
        writer.write("train", {**rec, "grad_norm": 1.0, "skipped": False})
        if it % 5 == 0:
            tp = {**rec, "consumed_samples": 16 * it, "step_time_ms": 100.0, "tokens_per_second": 1e4}
            writer.write("throughput", {**tp, **({"flops_per_token": fpt} if flops else {})})
        if it % 10 == 0:
            writer.write("validation", {**rec, "lm_loss": 9.0 - 0.1 * it, "ppl": 1.0})
    writer.close()
    if checkpoint:
        ckpt = run_dir / iteration_tag(20)
        ckpt.mkdir()
        save_model_file(str(ckpt / model_file_name(0)), {"w": torch.zeros(1)}, args.to_dict(), {})
        atomic_write_text(str(run_dir / "latest"), iteration_tag(20))
    return fpt


def test_run_directory_axes_and_table(tmp_path, capsys) -> None:
    cola = ModelArgs.from_size("debug").replace(vocab_size=512)
    full = cola.replace(full_rank=True)
    fpt_cola = fake_run(tmp_path / "cola", cola)
    fake_run(tmp_path / "full", full, checkpoint=False)
    png, table = tmp_path / "out.png", tmp_path / "table.md"
    argv = ["--run", f"CoLA={tmp_path / 'cola'}", "--run", str(tmp_path / "full" / "tensorboard")]
    assert (
        main([*argv, "--x", "tokens,flops", "--x", "hours", "--output", str(png), "--table", str(table)]) == 0
    )
    assert png.stat().st_size > 10_000
    run = read_run(f"CoLA={tmp_path / 'cola'}")  # the run directory, not its tensorboard/
    assert run.x("flops", 20, 20 * 1024) == fpt_cola * 20 * 1024
    assert run.x("hours", 20, 0) == pytest.approx(2.0 / 3600)  # 20 steps x 100 ms
    assert run.x("hours", 7, 0) == pytest.approx(0.7 / 3600)
    rows = table.read_text().splitlines()
    n_cola = cola.num_params()
    assert rows[2].startswith(
        f"| CoLA | {n_cola / 1e6:.3g}M ({(n_cola - 2 * 512 * 256) / 1e6:.3g}M) | 20.5k | "
    )
    assert rows[2].endswith(" | 2 s | 7.000 (1097) at iteration 20 |")
    assert rows[3].startswith("| tensorboard | n/a | 20.5k | ")
    assert table.read_text() in capsys.readouterr().out


def test_errors_name_the_directory(tmp_path, capsys) -> None:
    fake_run(tmp_path / "old", ModelArgs.from_size("debug"), flops=False, checkpoint=False)
    assert main(["--run", str(tmp_path / "old"), "--x", "flops", "--output", str(tmp_path / "a.png")]) == 1
    assert "has no flops_per_token" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a.png")
    assert main(["--run", str(tmp_path), "--output", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err
    assert f"no metrics.jsonl in {tmp_path} or {tmp_path / 'tensorboard'}" in err
