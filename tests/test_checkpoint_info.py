"""``megatron_cola.checkpoint.info``: which directory is read, and the rule of what a checkpoint resumes
on (``resumable_layouts``). The tool on a real checkpoint: ``test_checkpoint_faults.py``
(``test_checkpoint_info_on_a_real_checkpoint``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_cola.checkpoint.info import resolve, resumable_layouts
from megatron_cola.cli.checkpoint_info import main
from megatron_cola.errors import CheckpointError


def _meta(tp: int, zero: int, dp: int, *files: str) -> dict:
    return {"kind": "training", "tp_size": tp, "zero_stage": zero, "dp_size": dp, "files": list(files)}


def test_resumable_layouts_rule() -> None:
    zero1 = resumable_layouts(_meta(2, 1, 4, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert (zero1["tp_size"], zero1["zero_stage"], zero1["dp_size"]) == (2, 1, 4)
    zero0 = resumable_layouts(_meta(1, 0, 4, "mp_rank_00_model_states.pt"))
    assert (zero0["tp_size"], zero0["zero_stage"], zero0["dp_size"]) == (1, 0, "any")
    assert zero0["summary"].startswith("TP 1, ZeRO-0, any DP size")
    bottleneck = resumable_layouts(
        {**_meta(2, 1, 4, "mp_rank_00_model_states.pt"), "tp_scheme": "bottleneck"}
    )
    assert bottleneck["summary"].startswith("TP 2 (--cola-tp-scheme bottleneck), ZeRO-1, DP 4")
    free = resumable_layouts(_meta(2, 3, 2, "optim_tp00.pt", "optim_tp01.pt"))
    assert free["resume"] and {free[k] for k in ("tp_size", "zero_stage", "dp_size")} == {"any"}
    weights = resumable_layouts({"kind": "weights", "files": ["model_tp00.pt"]})
    assert not weights["resume"] and "--finetune" in weights["summary"]


def test_resolve_save_dir_single_checkpoint_and_neither(tmp_path: Path) -> None:
    for tag in ("iter_0000002", "iter_0000004"):
        (tmp_path / tag).mkdir()
        (tmp_path / tag / "model_tp00.pt").write_bytes(b"")
    assert resolve(str(tmp_path))[1] == str(tmp_path / "iter_0000004")  # no latest: the newest, noted
    assert "no latest file" in (resolve(str(tmp_path))[2] or "")
    (tmp_path / "latest").write_text("iter_0000002")
    assert resolve(str(tmp_path))[1] == str(tmp_path / "iter_0000002")
    assert resolve(str(tmp_path / "iter_0000004"))[1] == str(tmp_path / "iter_0000004")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve(str(tmp_path / "empty"))


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_missing_manifest_exits_1(tmp_path: Path, capsys) -> None:
    """A checkpoint whose save did not finish (model file there, no manifest)."""
    import torch

    d = tmp_path / "iter_0000003"
    d.mkdir()
    doc = {"format": "megatron-cola-model", "tp_size": 1, "iteration": 3, "state_dict": {"w": torch.ones(2)}}
    torch.save(doc, d / "model_tp00.pt")
    assert main([str(d)]) == 1
    out = capsys.readouterr().out
    assert "manifest:     missing" in out and "kind:         weights" in out and "iteration:    3" in out
