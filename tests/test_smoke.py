"""The multi-process smoke test of ``make test-fast``: one tiny 2-process gloo training run through
torchrun and ``pretrain_cola.py`` (2 iterations of the 2-layer debug model, then a save), checked end to
end. The full suite (``make test``) covers each part in depth; this catches a broken launch, process
group, DeepSpeed engine, step or save in a few seconds."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron_cola.checkpoint import CheckpointReader, load_full_state_dict
from megatron_cola.config import ModelArgs

from .conftest import run_torchrun, synthetic_args

pytestmark = pytest.mark.smoke


def test_two_process_train_and_save(synthetic_prefix: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    flags = synthetic_args(synthetic_prefix, "--train-iters", "2", "--global-batch-size", "8")
    proc = run_torchrun([*flags, "--eval-iters", "0", "--save", str(ckpt)], nproc=2, timeout=300)
    assert "world 2 = TP 1 x DP 2" in proc.stdout and "global batch 8 = 4 x 2 x 1" in proc.stdout
    losses = [float(x) for x in re.findall(r"\| lm loss: (\S+) \|", proc.stdout)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), proc.stdout[-3000:]
    assert losses[1] < losses[0]  # the step moved the weights the right way (seeded data and init)
    assert "| number of skipped iterations:   0 |" in proc.stdout

    reader = CheckpointReader.latest(str(ckpt))
    assert reader is not None and reader.iteration == 2 and reader.verify() == []
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    state, meta = load_full_state_dict(str(ckpt))
    assert meta["iteration"] == 2 and ModelArgs.from_dict(meta["args"]).num_layers == 2
    assert all(torch.isfinite(t).all() for t in state.values())
