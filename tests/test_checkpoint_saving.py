"""Saving checkpoints (issue 19): ``--async-save``, a save that fails on one rank, the ``--save`` lock,
``--keep-last-checkpoints``, ``--save-interval-minutes``, and ``convert_to_hf.py`` never replacing the
checkpoint it reads.

In-process tests build checkpoint directories with the real writer; one script drives
``save_checkpoint`` on 2 gloo ranks under torchrun. The ``--async-save`` kill-and-resume run is in
``test_checkpoint_faults.py`` (it reuses that module's synchronous ``base_run`` as its reference).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cola.checkpoint.async_save import BackgroundSave, status_file
from megatron_cola.checkpoint.io import CheckpointWriter, HostBuffers, snapshot
from megatron_cola.checkpoint.lock import LOCK_FILE, SaveDirLock
from megatron_cola.checkpoint.manifest import MANIFEST_FILE, verify_checkpoint, write_manifest
from megatron_cola.checkpoint.recovery import prune_checkpoints
from megatron_cola.errors import CheckpointError, ConversionError

from .conftest import ROOT, dist_env, synthetic_args


# -------------------------------------------------------------------------------------- snapshots
def test_snapshot_is_independent_and_keeps_shared_storage() -> None:
    flat = torch.arange(10, dtype=torch.float32)
    state = {"a": flat[:4], "b": flat[4:], "step": torch.tensor(3), "nested": [{"x": flat}], "lr": 0.1}
    snap = snapshot(state)
    flat.add_(100)  # training goes on
    state["step"] += 1
    assert snap["a"].tolist() == [0, 1, 2, 3] and snap["b"].tolist() == [4, 5, 6, 7, 8, 9]
    assert int(snap["step"]) == 3 and snap["lr"] == 0.1
    # Views of one storage still share one copy: torch.save writes the same file as from the original.
    assert snap["a"].untyped_storage().data_ptr() == snap["nested"][0]["x"].untyped_storage().data_ptr()
    assert snap["a"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    # With HostBuffers the next save's snapshot reuses the same host memory (no fresh pages).
    buffers = HostBuffers()
    first = snapshot(state, buffers=buffers)
    ptr = first["a"].untyped_storage().data_ptr()
    buffers.release_all()
    flat.mul_(2)
    second = snapshot(state, buffers=buffers)
    assert second["a"].untyped_storage().data_ptr() == ptr and second["b"].tolist() == flat[4:].tolist()


# ------------------------------------------------------------------------------ background writer
def _background(root: Path, iteration: int, rank: int = 0) -> CheckpointWriter:
    w = CheckpointWriter(str(root), iteration, rank=rank, background=True)
    w.write_torch("mp_rank_00_model_states.pt", {"w": torch.ones(100)}, atomic=False)
    w.save_torch(f"rng_state_{rank:05d}.pt", {"torch": torch.get_rng_state()})
    return w


def test_background_save_writes_manifest_then_latest(tmp_path: Path) -> None:
    w = _background(tmp_path, 5)
    assert not (tmp_path / "iter_0000005").exists() or not os.listdir(tmp_path / "iter_0000005")
    bg = BackgroundSave(w, world_size=1, log=lambda _: None).start()
    bg.join()
    assert bg.error is None and bg.committed
    assert (tmp_path / "latest").read_text().strip() == "iter_0000005"
    assert verify_checkpoint(str(tmp_path / "iter_0000005")) == []
    assert sorted(os.listdir(tmp_path / "iter_0000005")) == [
        MANIFEST_FILE, "mp_rank_00_model_states.pt", "rng_state_00000.pt"
    ]  # fmt: skip


def test_background_save_failure_on_another_rank_never_moves_latest(tmp_path: Path) -> None:
    first = BackgroundSave(_background(tmp_path, 1), world_size=1, log=lambda _: None).start()
    first.join()
    w = _background(tmp_path, 2)
    # Rank 1 reported a failed write (as its own BackgroundSave would): rank 0 removes the directory.
    failure = {"rank": 1, "path": "/x/iter_0000002/zero_pp_rank_1.pt", "reason": "no space left on device",
               "disk_full": True}  # fmt: skip
    os.makedirs(w.dir, exist_ok=True)
    (Path(w.dir) / status_file(1)).write_text(json.dumps({"rank": 1, "files": {}, "failures": [failure]}))
    lines: list[str] = []
    bg = BackgroundSave(w, world_size=2, log=lines.append).start()
    bg.join()
    assert bg.error is not None and not bg.committed
    assert "no space left on device while writing /x/iter_0000002/zero_pp_rank_1.pt (rank 1)" in bg.error
    assert f"the last complete checkpoint is {tmp_path / 'iter_0000001'}" in bg.error
    assert "ERROR" in lines[0] and not Path(w.dir).exists()
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    # Weights that are not finite (checked in the background, on the snapshot): never marked complete.
    w = _background(tmp_path, 4)
    bg = BackgroundSave(
        w, 1, log=lambda _: None, check_finite={"norm.weight": torch.tensor([1.0, float("nan")])}
    )
    bg.start().join()
    assert "parameter norm.weight holds NaN/Inf (rank 0)" in (bg.error or "") and not bg.committed
    assert not Path(w.dir).exists() and (tmp_path / "latest").read_text().strip() == "iter_0000001"
    # A rank that never reports: rank 0 gives up when the run ends, nothing is marked complete.
    bg = BackgroundSave(_background(tmp_path, 3), world_size=2, log=lambda _: None).start()
    bg.join(abort=True)
    assert "rank(s) [1] did not finish writing" in (bg.error or "")
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "iter_0000003" / MANIFEST_FILE).exists()


# ---------------------------------------------------------------------------------------- rotation
def _complete(root: Path, iteration: int, manifest: bool = True) -> Path:
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "model_tp00.pt").write_bytes(os.urandom(100))
    if manifest:
        write_manifest(str(d), iteration)
    return d


def test_keep_last_checkpoints_deletes_only_older_complete_ones(tmp_path: Path) -> None:
    for it in (1, 2, 3, 5, 6):
        _complete(tmp_path, it)
    _complete(tmp_path, 4, manifest=False)  # a save that did not finish: kept for inspection
    (tmp_path / "iter_0000001.corrupt-1").mkdir()
    (tmp_path / "latest").write_text("iter_0000002")  # e.g. a fallback: never deleted
    deleted = prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(d) for d in deleted) == ["iter_0000001", "iter_0000003"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "latest") == [
        "iter_0000001.corrupt-1", "iter_0000002", "iter_0000004", "iter_0000005", "iter_0000006"
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ lock
def test_save_dir_lock_refuses_a_second_run_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    lock = SaveDirLock(str(tmp_path))
    assert lock.acquire() is None and (tmp_path / LOCK_FILE).exists()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    named = f"in use by another run \\(host {socket.gethostname()}, pid {os.getpid()}, since "
    with pytest.raises(CheckpointError, match=f"{named}.*delete {tmp_path / LOCK_FILE}"):
        SaveDirLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # A crashed holder on this host: its pid is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}))
    again = SaveDirLock(str(tmp_path))
    note = again.acquire()
    assert note is not None and f"pid {dead.pid}" in note and "took over" in note
    again.release()
    # A holder on another host cannot be checked: refused.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(CheckpointError, match="host elsewhere, pid 1"):
        SaveDirLock(str(tmp_path)).acquire()


# --------------------------------------------------------------------------------- convert_to_hf
def test_convert_to_hf_never_replaces_the_checkpoint_it_reads(tmp_path: Path) -> None:
    from megatron_cola.cli import convert_to_hf

    ckpt = tmp_path / "run" / "ckpt"
    d = _complete(ckpt, 2)
    (ckpt / "latest").write_text("iter_0000002")
    before = sorted(p.name for p in d.iterdir())
    for save in (ckpt, ckpt.parent, d):
        with pytest.raises(ConversionError, match="is, or contains, the checkpoint being read"):
            from megatron_cola.convert.export import export_checkpoint

            export_checkpoint(str(ckpt), str(save), overwrite=True)
        assert convert_to_hf.main(["--load", str(ckpt), "--save", str(save), "--overwrite"]) == 2
    assert sorted(p.name for p in d.iterdir()) == before
    # --overwrite replaces only an HF export.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    from megatron_cola.convert.export import _check_target

    with pytest.raises(ConversionError, match="replaces only a Hugging Face export"):
        _check_target(str(other), overwrite=True)
    (other / "config.json").write_text("{}")
    (other / "model.safetensors").write_bytes(b"")
    _check_target(str(other), overwrite=True)  # an HF export may be replaced


# ------------------------------------------------------------------------ a save failing on one rank
_ONE_RANK_FAILS = """
import os, sys, torch, torch.distributed as dist
from megatron_cola.errors import CheckpointError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
from megatron_cola.training.checkpointing import AsyncSaves, save_checkpoint
from megatron_cola.training.ds_config import build_ds_config
from megatron_cola.training.engine import build_engine, build_parallel_model
from megatron_cola.training.pretrain import init_distributed

cfg = build_train_config(parse_args(sys.argv[1:]))
model_args = model_args_from(cfg, 256)
cpu = torch.device("cpu")
init_distributed(cpu)
rank = dist.get_rank()
parallel = ParallelState.from_torch_distributed(1)
model = build_parallel_model(1, model_args, parallel, cpu)
engine, _ = build_engine(cfg, model, parallel, cpu, build_ds_config(cfg, "cpu"))
save = lambda it, saves=None: save_checkpoint(engine, cfg, model_args, parallel, it, 16 * it, None, 256, {},
                                              saves=saves)
save(1)
if rank == 1:  # rank 1's disk fails: its optimizer shard goes to /dev/full
    named = engine._get_zero_ckpt_name
    def to_dev_full(save_dir, tag):
        path = named(save_dir, tag)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):
            os.symlink("/dev/full", path)
        return path
    engine._get_zero_ckpt_name = to_dev_full
try:
    save(2)
    print(f"RANK{rank} SAVED 2", flush=True)
except CheckpointError as e:
    print(f"RANK{rank} REFUSED 2: {e}", flush=True)
saves = AsyncSaves()
save(3, saves)  # returns after the snapshot; the failure shows at the next step's poll
saves.pending.join()
try:
    saves.poll()
    saves.wait()
    print(f"RANK{rank} SAVED 3", flush=True)
except CheckpointError as e:
    print(f"RANK{rank} REFUSED 3: {e}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_save_failing_on_one_rank_stops_every_rank_naming_file_and_rank(
    synthetic_prefix: str, tmp_path: Path
) -> None:
    """ENOSPC on rank 1's file only (``/dev/full`` standing in for its disk), synchronous and in the
    background: no rank is left waiting, every rank reports rank 1's file, ``latest`` stays."""
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "one_rank_fails.py"
    script.write_text(_ONE_RANK_FAILS)
    flags = [*synthetic_args(synthetic_prefix, "--train-iters", "4"), "--save", str(ckpt), "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        [*cmd, *flags], env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = {it: ckpt / f"iter_{it:07d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt" for it in (2, 3)}
    for it in (2, 3):
        for rank in (0, 1):
            line = next(x for x in proc.stdout.splitlines() if x.startswith(f"RANK{rank} REFUSED {it}:"))
            assert f"no space left on device while writing {bad[it]} (rank 1)" in line, line
            assert f"the last complete checkpoint is {ckpt / 'iter_0000001'}" in line, line
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]


def test_saving_flags_are_checked(synthetic_prefix: str) -> None:
    from megatron_cola.training.arguments import ArgumentError, build_train_config, parse_args

    base = synthetic_args(synthetic_prefix, "--train-iters", "4")
    for extra, message in (
        (["--async-save"], "--async-save needs --save DIR"),
        (["--keep-last-checkpoints", "2"], "--keep-last-checkpoints needs --save DIR"),
        (["--save", "x", "--keep-last-checkpoints", "0"], "--keep-last-checkpoints must be >= 1"),
        (["--save", "x", "--save-interval-minutes", "-1"], "--save-interval-minutes must be > 0"),
    ):
        with pytest.raises(ArgumentError, match=message):
            build_train_config(parse_args([*base, *extra]), world_size=1)
    flags = ["--save", "x", "--async-save", "--save-interval-minutes", "30", "--keep-last-checkpoints", "3"]
    cfg = build_train_config(parse_args([*base, *flags]), world_size=1)
    assert cfg.async_save and cfg.save_interval_minutes == 30 and cfg.keep_last_checkpoints == 3
