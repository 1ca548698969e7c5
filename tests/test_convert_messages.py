"""What tools/convert_from_hf.py and a later weights-only load tell the user: an HF folder without a
tokenizer, an existing --save, and a checkpoint of another architecture (the sizes it records against
those asked for)."""

from __future__ import annotations

import pytest

from megatron_cola.checkpoint.weights import load_weights_only
from megatron_cola.cli.convert_from_hf import main
from megatron_cola.config import ModelArgs
from megatron_cola.convert.export import write_hf_folder
from megatron_cola.errors import CheckpointError
from megatron_cola.model import build_model

TINY = ModelArgs(
    hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_layers=2, vocab_size=96, cola_rank=16
)


def test_import_without_tokenizer_says_so_and_mismatch_names_sizes(tmp_path, capsys) -> None:
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    write_hf_folder(build_model(TINY, seed=0).state_dict(), TINY, str(hf), dtype="fp32")
    assert main(["--load", str(hf), "--save", str(ckpt)]) == 0
    err = capsys.readouterr().err
    assert f"convert_from_hf: note: {hf} has no tokenizer" in err and "--tokenizer-model PATH" in err
    # written through the checkpoint seam: manifest, ``latest`` and Megatron's iteration marker
    assert (ckpt / "latest").read_text().strip() == "iter_0000000"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (ckpt / "iter_0000000" / "manifest.json").exists()
    # a user mistake is one plain line and exit status 2, as pretrain_cola.py
    assert main(["--load", str(hf), "--save", str(ckpt)]) == 2
    assert capsys.readouterr().err == (
        f"convert_from_hf: error: {ckpt} already holds a checkpoint; pass --overwrite to replace it\n"
    )

    deeper = build_model(TINY.replace(num_layers=3), seed=0)
    with pytest.raises(CheckpointError) as e:
        load_weights_only(deeper, str(ckpt))
    msg = str(e.value)
    assert "missing ['layers.2." in msg
    assert "the checkpoint records hidden size 64, 2 layers, FFN 176, 4 heads, CoLA rank 16" in msg
    assert "this run asked for hidden size 64, 3 layers, FFN 176, 4 heads, CoLA rank 16" in msg

    wider = build_model(TINY.replace(hidden_size=128, num_attention_heads=4), seed=0)
    with pytest.raises(
        CheckpointError, match=r"records hidden size 64, .* asked for hidden size 128, 2 layers"
    ):
        load_weights_only(wider, str(ckpt))
