"""End to end: train with TP=2 and ZeRO-2/3, export to Hugging Face, and get our logits back."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_cola.checkpoint import load_full_state_dict
from megatron_cola.config import ModelArgs
from megatron_cola.model import CoLALlama

from .conftest import ROOT, run_torchrun, synthetic_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("full_rank, zero", [(False, "3"), (True, "2")])
def test_trained_tp2_checkpoint_exports_to_hf(
    synthetic_prefix: str, tmp_path, full_rank: bool, zero: str
) -> None:
    transformers = pytest.importorskip("transformers")
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    args = synthetic_args(
        synthetic_prefix,
        "--train-iters",
        "2",
        "--zero-stage",
        zero,
        "--tensor-model-parallel-size",
        "2",
        "--save",
        str(ckpt),
    )
    args[args.index("--vocab-size") + 1] = "250"  # 251 ids, padded to 256 for TP=2: export must drop it
    if full_rank:
        args.append("--full-rank")
    run_torchrun(args)
    assert sorted(p.name for p in (ckpt / "iter_0000002").glob("model_tp*.pt")) == [
        "model_tp00.pt",
        "model_tp01.pt",
    ]

    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_to_hf.py"),
            "--load",
            str(ckpt),
            "--save",
            str(hf),
            "--dtype",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    state, meta = load_full_state_dict(str(ckpt), drop_vocab_padding=True)
    ours = CoLALlama(ModelArgs.from_dict(meta["args"]))
    ours.load_state_dict(state)
    assert ours.args.vocab_size == 251
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf), trust_remote_code=True, dtype=torch.float32
    )
    assert type(model).__name__ == ("LlamaForCausalLM" if full_rank else "ColaForCausalLM")
    tokens = torch.randint(0, 251, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        got = model(tokens).logits
    assert got.shape == expected.shape == (2, 24, 251)
    assert (got - expected).abs().max().item() < 1e-4


def test_hf_import_continues_training(synthetic_prefix: str, tmp_path) -> None:
    """ours -> HF -> convert_from_hf -> pretrain_cola.py --load: training continues from the weights
    (the import is unpadded; the run pads its embedding/head to its own vocab multiple)."""
    pytest.importorskip("transformers")
    ckpt, hf, imported = tmp_path / "ckpt", tmp_path / "hf", tmp_path / "imported"
    base = synthetic_args(synthetic_prefix, "--zero-stage", "1")
    run_torchrun(
        [*base, "--train-iters", "20", "--save", str(ckpt), "--tensorboard-dir", str(tmp_path / "a")]
    )
    for tool, src, dst in (("convert_to_hf.py", ckpt, hf), ("convert_from_hf.py", hf, imported)):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), "--load", str(src), "--save", str(dst)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_torchrun(
        [
            *base,
            "--train-iters",
            "1",
            "--lr",
            "1e-9",
            "--lr-warmup-iters",
            "0",
            "--load",
            str(imported),
            "--tensorboard-dir",
            str(tmp_path / "b"),
        ]
    )
    assert "loaded weights only" in out.stdout
    from .test_training import train_losses

    trained, continued = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert continued[1] < trained[1] - 1.0  # far below a fresh model's loss
    assert abs(continued[1] - trained[20]) < 0.5
