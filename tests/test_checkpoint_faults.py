"""Fault injection on checkpoints: manifests, fallbacks, no silent restart, safe loading, disk full.

Unit tests build checkpoint directories by hand; the runs (``pretrain_cola.py`` under torchrun, debug
model, synthetic data) share one base run with checkpoints at iterations 2 and 4, copied per test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cola.checkpoint import CheckpointReader
from megatron_cola.checkpoint.deepspeed_state import load_rng_state
from megatron_cola.checkpoint.manifest import MANIFEST_FILE, read_manifest, verify_checkpoint, write_manifest
from megatron_cola.checkpoint.recovery import select_checkpoint
from megatron_cola.errors import CheckpointError, ConversionError

from .conftest import ROOT, dist_env, run_torchrun, synthetic_args


def _fake_checkpoint(root: Path, iteration: int, manifest: bool = True, kind: str = "training") -> Path:
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    if kind == "training":
        (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1000))
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(3000))
        (d / "rng_state_00000.pt").write_bytes(os.urandom(100))
    (d / "model_tp00.pt").write_bytes(os.urandom(2000))
    if manifest:
        write_manifest(str(d), iteration, kind)
    return d


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ manifests
def test_manifest_detects_flip_truncation_and_deletion(tmp_path: Path) -> None:
    d = _fake_checkpoint(tmp_path, 10)
    doc = read_manifest(str(d))
    assert doc is not None and doc["kind"] == "training" and len(doc["files"]) == 4
    assert doc["files"]["model_tp00.pt"]["bytes"] == 2000
    assert verify_checkpoint(str(d)) == []
    _flip_byte(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (problem,) = verify_checkpoint(str(d))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in problem and "checksum" in problem
    with open(d / "model_tp00.pt", "r+b") as f:
        f.truncate(1500)
    assert any("model_tp00.pt has 1500 bytes" in p for p in verify_checkpoint(str(d)))
    (d / "rng_state_00000.pt").unlink()
    assert any("rng_state_00000.pt is missing" in p for p in verify_checkpoint(str(d)))
    # Only the files asked for are hashed.
    assert verify_checkpoint(str(d), ["mp_rank_00_model_states.pt"]) == []
    assert "no manifest.json" in verify_checkpoint(str(tmp_path))[0]


# ------------------------------------------------------------------------------------- selection
def test_select_uses_latest_when_it_verifies(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_text("iter_0000002\n")  # e.g. killed between manifest and latest
    sel = select_checkpoint(str(tmp_path))
    assert sel is not None and sel.reader.tag == "iter_0000002" and not sel.notes and not sel.weights_only


@pytest.mark.parametrize("latest", [None, "", "iter_0000009"])
def test_unusable_latest_falls_back_to_newest_verified(tmp_path: Path, latest: str | None) -> None:
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, manifest=False)  # a save that did not finish
    if latest is not None:
        (tmp_path / "latest").write_text(latest)
    sel = select_checkpoint(str(tmp_path))
    assert sel is not None and sel.reader.tag == "iter_0000004"
    text = "\n".join(sel.notes)
    assert "iter_0000006 has no manifest.json" in text and "falling back to" in text


def test_corrupt_latest_falls_back_with_warning_naming_file(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 2)
    bad = _fake_checkpoint(tmp_path, 4)
    (tmp_path / "latest").write_text("iter_0000004")
    with open(bad / "model_tp00.pt", "r+b") as f:  # truncated
        f.truncate(10)
    sel = select_checkpoint(str(tmp_path))
    assert sel is not None and sel.reader.tag == "iter_0000002"
    assert sel.skipped == [str(bad)]
    assert any("WARNING" in n and str(bad / "model_tp00.pt") in n for n in sel.notes)


def test_no_usable_checkpoint_stops(tmp_path: Path) -> None:
    bad = _fake_checkpoint(tmp_path, 4)
    _flip_byte(bad / "mp_rank_00_model_states.pt")
    (tmp_path / "latest").write_text("iter_0000004")
    with pytest.raises(CheckpointError, match="none is usable.*mp_rank_00_model_states.pt"):
        select_checkpoint(str(tmp_path))
    assert select_checkpoint(str(tmp_path / "empty")) is None  # nothing there: a fresh start is fine


def test_pre_manifest_checkpoint_loads_unverified(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 4, manifest=False)
    (tmp_path / "latest").write_text("iter_0000004")
    sel = select_checkpoint(str(tmp_path))
    assert sel is not None and sel.reader.tag == "iter_0000004" and "unverified" in sel.notes[0]
    # ... but never as weights only when its DeepSpeed files are gone.
    (tmp_path / "iter_0000004" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="DeepSpeed files .* are missing"):
        select_checkpoint(str(tmp_path))
    sel = select_checkpoint(str(tmp_path), finetune=True)  # its weights are still there to fine-tune
    assert sel is not None and sel.weights_only


def test_weights_only_folder_is_recognised(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 0, kind="weights")
    (tmp_path / "latest").write_text("iter_0000000")
    sel = select_checkpoint(str(tmp_path))
    assert sel is not None and sel.weights_only


# ---------------------------------------------------------------------------------- safe loading
class _SideEffect:
    """Unpickling this creates a marker file (what a malicious checkpoint could do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(root: Path, marker: Path) -> None:
    from megatron_cola.config import ModelArgs

    d = root / "iter_0000000"
    d.mkdir(parents=True)
    obj = {
        "format": "megatron-cola-model",
        "version": 1,
        "args": ModelArgs.from_size("debug").to_dict(),
        "vocab_size": None,
        "tp_rank": 0,
        "tp_size": 1,
        "split_dims": {},
        "state_dict": {"x": torch.zeros(2)},
        "iteration": 0,
        "tokenizer": _SideEffect(str(marker)),
    }
    torch.save(obj, d / "model_tp00.pt")
    write_manifest(str(d), 0, "weights")
    (root / "latest").write_text("iter_0000000")


def test_pickle_side_effect_refused_by_convert_to_hf(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    _evil_checkpoint(tmp_path / "ckpt", marker)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--load", str(tmp_path / "ckpt"),
         "--save", str(tmp_path / "hf")],
        env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "model_tp00.pt holds Python objects that a safe load" in proc.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_pickle_side_effect_refused_by_finetune(synthetic_prefix: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    _evil_checkpoint(tmp_path / "ckpt", marker)
    proc = run_torchrun(
        [*synthetic_args(synthetic_prefix, "--train-iters", "4"), "--load", str(tmp_path / "ckpt"),
         "--finetune", "--save", str(tmp_path / "out")],
        nproc=1, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "holds Python objects that a safe load" in proc.stderr
    assert not marker.exists()


def test_old_numpy_rng_file_still_loads(tmp_path: Path) -> None:
    import random

    d = tmp_path / "iter_0000001"
    d.mkdir()
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, d / "rng_state_00000.pt")  # the format before plain types: a numpy array inside
    np.random.seed(0)
    assert load_rng_state(CheckpointReader(str(tmp_path), 1), 0)
    assert np.array_equal(np.random.rand(3), expected)


def test_truncated_model_file_names_the_file(tmp_path: Path) -> None:
    from megatron_cola.checkpoint import load_full_state_dict

    d = tmp_path / "iter_0000000"
    d.mkdir()
    torch.save({"format": "megatron-cola-model", "state_dict": {"x": torch.zeros(1000)}}, d / "model_tp00.pt")
    with open(d / "model_tp00.pt", "r+b") as f:
        f.truncate(500)
    (tmp_path / "latest").write_text("iter_0000000")
    with pytest.warns(UserWarning, match="unverified"), pytest.raises(CheckpointError) as err:
        load_full_state_dict(str(tmp_path))
    assert str(d / "model_tp00.pt") in str(err.value) and "truncated" in str(err.value)


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from megatron_cola.convert.hf_format import load_hf_tensors

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    with open(path, "r+b") as f:
        f.truncate(2000)
    with pytest.raises(ConversionError, match=f"{path}.*truncated"):
        load_hf_tensors(str(tmp_path))


# ------------------------------------------------------------------------------------------- runs
def _losses(tb_dir: Path) -> dict[int, float]:
    from .test_training import train_losses

    return train_losses(str(tb_dir))


def _run_args(prefix: str, *extra: str, save_interval: int = 2) -> list[str]:
    """Six iterations (the schedule every run here shares), a checkpoint every ``save_interval``."""
    return [*synthetic_args(prefix, "--train-iters", "6", "--save-interval", str(save_interval)), *extra]


@pytest.fixture(scope="module")
def base_run(synthetic_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Iterations 1-4 of 6 (``--exit-interval 4``), checkpoints at 2 and 4 in ``ckpt/``, losses in ``tb/``."""
    d = tmp_path_factory.mktemp("base")
    run_torchrun(
        [
            *_run_args(synthetic_prefix, "--exit-interval", "4"),
            "--save",
            str(d / "ckpt"),
            "--tensorboard-dir",
            str(d / "tb"),
        ]
    )
    return d


def _copy(base_run: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_run / "ckpt", ckpt)
    return ckpt


def _resume(prefix: str, ckpt: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_torchrun([*_run_args(prefix), "--load", str(ckpt), "--save", str(ckpt)], check=check)


@pytest.mark.slow
def test_corrupt_optimizer_byte_falls_back(synthetic_prefix: str, base_run: Path, tmp_path: Path) -> None:
    ckpt = _copy(base_run, tmp_path)
    bad = ckpt / "iter_0000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _flip_byte(bad, 4000)
    proc = _resume(synthetic_prefix, ckpt)
    assert f"failed verification: {bad} does not match" in proc.stdout
    assert "resumed from" in proc.stdout and "iter_0000002 at iteration 2" in proc.stdout
    aside = [p.name for p in ckpt.iterdir() if p.name.startswith("iter_0000004.corrupt-")]
    assert len(aside) == 1 and (ckpt / aside[0] / bad.name).exists()  # moved aside, never deleted
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert verify_checkpoint(str(ckpt / "iter_0000004")) == []  # the new, good one


@pytest.mark.slow
def test_deleted_latest_resumes_newest_verified(
    synthetic_prefix: str, base_run: Path, tmp_path: Path
) -> None:
    ckpt = _copy(base_run, tmp_path)
    (ckpt / "latest").unlink()
    proc = _resume(synthetic_prefix, ckpt)
    assert "latest is missing or empty" in proc.stdout
    assert "iter_0000004 at iteration 4" in proc.stdout and "starting from scratch" not in proc.stdout


@pytest.mark.slow
def test_missing_deepspeed_files_never_restart(synthetic_prefix: str, base_run: Path, tmp_path: Path) -> None:
    ckpt = _copy(base_run, tmp_path)
    (ckpt / "iter_0000004" / "mp_rank_00_model_states.pt").unlink()
    proc = _resume(synthetic_prefix, ckpt)
    assert "mp_rank_00_model_states.pt is missing" in proc.stdout
    assert "iter_0000002 at iteration 2" in proc.stdout and "weights only" not in proc.stdout
    # With no fallback left it stops, and nothing was written.
    for it in (2, 4, 6):
        shutil.rmtree(ckpt / f"iter_{it:07d}", ignore_errors=True)
    shutil.copytree(base_run / "ckpt" / "iter_0000004", ckpt / "iter_0000004")
    (ckpt / "iter_0000004" / "mp_rank_00_model_states.pt").unlink()
    (ckpt / "latest").write_text("iter_0000004")
    before = sorted(os.listdir(ckpt))
    proc = _resume(synthetic_prefix, ckpt, check=False)
    assert proc.returncode != 0 and "none is usable" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(ckpt)) == before and "iteration        1/" not in proc.stdout


@pytest.mark.slow
def test_save_dir_with_checkpoints_is_refused(synthetic_prefix: str, base_run: Path, tmp_path: Path) -> None:
    ckpt = _copy(base_run, tmp_path)
    proc = run_torchrun([*_run_args(synthetic_prefix), "--save", str(ckpt)], check=False)
    assert proc.returncode != 0
    assert f"pass --load {ckpt} to resume, or choose another --save" in proc.stderr


@pytest.mark.slow
def test_kill_during_save_then_exact_resume(synthetic_prefix: str, base_run: Path, tmp_path: Path) -> None:
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    args = _run_args(synthetic_prefix, "--exit-interval", "4", save_interval=1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [
        *launcher,
        str(ROOT / "pretrain_cola.py"),
        *args,
        "--save",
        str(ckpt),
        "--tensorboard-dir",
        str(tb),
    ]
    proc = subprocess.Popen(cmd, env=dist_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    killed_in = None
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        partial = [
            d for d in ckpt.glob("iter_*") if d.name != "iter_0000001" and not (d / MANIFEST_FILE).exists()
        ]
        if partial and (ckpt / "latest").exists():
            for pid in [*_children(proc.pid), proc.pid]:  # torchrun starts its workers in new sessions
                os.kill(pid, signal.SIGKILL)
            killed_in = partial[0].name
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_in is not None, "the run finished before a save could be interrupted"
    latest = (ckpt / "latest").read_text().strip()
    assert latest != killed_in and verify_checkpoint(str(ckpt / latest)) == []
    resumed = _resume_to(synthetic_prefix, ckpt, tb)
    assert f"resumed from {ckpt / latest}" in resumed.stdout
    straight, split = _losses(base_run / "tb"), _losses(tb)
    for it in range(int(latest[5:]) + 1, 5):
        assert f"{split[it]:.6E}" == f"{straight[it]:.6E}", (it, split[it], straight[it])


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _resume_to(prefix: str, ckpt: Path, tb: Path) -> subprocess.CompletedProcess:
    args = _run_args(prefix, "--exit-interval", "4", save_interval=1)
    return run_torchrun([*args, "--load", str(ckpt), "--save", str(ckpt), "--tensorboard-dir", str(tb)])


@pytest.mark.slow
def test_disk_full_on_tmpfs(synthetic_prefix: str, tmp_path: Path) -> None:
    """One checkpoint (~16 MB without the layout-free optimizer state) fits, the second does not: a clear
    error, no partial directory."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[-200:]}")
    try:
        ckpt = mnt / "ckpt"
        proc = run_torchrun(
            [
                *_run_args(synthetic_prefix, "--exit-interval", "4", "--no-save-reshardable-optim"),
                "--save",
                str(ckpt),
            ],
            check=False,
        )
        assert proc.returncode != 0, proc.stderr[-3000:]
        assert "no space left on device while writing" in proc.stderr
        assert f"the last complete checkpoint is {ckpt / 'iter_0000002'}" in proc.stderr
        assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000002"]
        assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


_NON_FINITE_SCRIPT = """
import sys, torch
from megatron_cola.errors import CheckpointError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
from megatron_cola.training.checkpointing import save_checkpoint
from megatron_cola.training.ds_config import build_ds_config
from megatron_cola.training.engine import build_engine, build_parallel_model
from megatron_cola.training.pretrain import init_distributed

cfg = build_train_config(parse_args(sys.argv[1:]), world_size=1)
model_args = model_args_from(cfg, 256)
init_distributed(torch.device("cpu"))
parallel = ParallelState.from_torch_distributed(1)
cpu = torch.device("cpu")
model = build_parallel_model(1, model_args, parallel, cpu)
engine, _ = build_engine(cfg, model, parallel, cpu, build_ds_config(cfg, "cpu"))
save_checkpoint(engine, cfg, model_args, parallel, 1, 16, None, 256, {})
with torch.no_grad():
    dict(engine.module.named_parameters())["norm.weight"][0] = float("nan")
try:
    save_checkpoint(engine, cfg, model_args, parallel, 2, 32, None, 256, {})
except CheckpointError as e:
    print("REFUSED", e)
"""


@pytest.mark.slow
def test_non_finite_weights_never_become_latest(synthetic_prefix: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    flags = [*synthetic_args(synthetic_prefix, "--train-iters", "4"), "--save", str(ckpt), "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-c", _NON_FINITE_SCRIPT, *flags],
        env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED parameter norm.weight holds NaN/Inf at iteration 2" in proc.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000001"]


@pytest.mark.slow
def test_async_save_kill_resume_equals_sync_run(
    synthetic_prefix: str, base_run: Path, tmp_path: Path
) -> None:
    """--async-save: a SIGKILL during a background write leaves ``latest`` on a complete checkpoint; the
    resume (the dead run's lock taken over) gives the losses of ``base_run``, which saved synchronously,
    bit for bit, saves by time (``--save-interval-minutes``), keeps the last 2, and its exit waits for the
    pending save. A resume refused by its checks writes nothing."""
    from megatron_cola.checkpoint.lock import LOCK_FILE

    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    flags = ["--async-save", "--exit-interval", "4", "--save", str(ckpt), "--tensorboard-dir", str(tb)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, str(ROOT / "pretrain_cola.py"), *_run_args(synthetic_prefix, *flags, save_interval=1)]
    run = subprocess.Popen(cmd, env=dist_env(), cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    killed_in = None
    deadline = time.time() + 300
    while run.poll() is None and time.time() < deadline:
        partial = [d for d in ckpt.glob("iter_000000[1-4]") if not (d / MANIFEST_FILE).exists()]
        if partial and (ckpt / "latest").exists():
            for pid in [*_children(run.pid), run.pid]:
                os.kill(pid, signal.SIGKILL)
            killed_in = partial[0].name
            break
        time.sleep(0.002)
    run.wait()
    assert killed_in is not None, "the run finished before a background save could be interrupted"
    latest = (ckpt / "latest").read_text().strip()
    assert latest != killed_in and verify_checkpoint(str(ckpt / latest)) == []
    assert (ckpt / LOCK_FILE).exists()  # the killed run's

    # Saves by time only (every log line), keeps 2, stops at iteration 4 through the exit path that a
    # signal or the time limit takes: the last save is complete before the run ends with status 0.
    timed = ["--save-interval-minutes", "1e-9", "--keep-last-checkpoints", "2"]
    resumed = run_torchrun(
        [*_run_args(synthetic_prefix, *flags, *timed, save_interval=1000), "--load", str(ckpt)]
    )
    assert "took over the lock of a run that is gone" in resumed.stdout
    assert f"resumed from {ckpt / latest}" in resumed.stdout
    assert "in the background (training paused" in resumed.stdout
    assert f"saved checkpoint {ckpt / 'iter_0000004'} (written in the background" in resumed.stdout
    straight, split = _losses(base_run / "tb"), _losses(tb)
    for it in range(1, 5):
        assert split[it] == straight[it], (it, split[it], straight[it])
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    complete = sorted(d.name for d in ckpt.glob("iter_*") if (d / MANIFEST_FILE).exists())
    assert complete == ["iter_0000003", "iter_0000004"] and "(--keep-last-checkpoints 2)" in resumed.stdout
    assert verify_checkpoint(str(ckpt / "iter_0000004")) == []
    assert not list(ckpt.glob("iter_*/.async-status-*")) and not (ckpt / LOCK_FILE).exists()
    sizes = [(d / "iter_0000004" / "model_tp00.pt").stat().st_size for d in (ckpt, base_run / "ckpt")]
    assert sizes[0] == sizes[1]  # the model file's format does not depend on how it was saved

    # A resume refused by its checks writes nothing into the checkpoint directory.
    (ckpt / "ds_config.json").unlink()
    before = sorted(os.listdir(ckpt))
    changed = [
        *_run_args(synthetic_prefix),
        "--load",
        str(ckpt),
        "--save",
        str(ckpt),
        "--global-batch-size",
        "32",
    ]
    refused = run_torchrun(changed, nproc=1, check=False)
    assert refused.returncode != 0
    assert "--global-batch-size was 16, now 32 (pass --global-batch-size 16" in refused.stderr
    assert sorted(os.listdir(ckpt)) == before


@pytest.mark.slow
def test_checkpoint_info_on_a_real_checkpoint(base_run: Path, tmp_path: Path, capsys) -> None:
    """``tools/checkpoint_info.py`` on the 2-rank ZeRO-1 run's checkpoints: layout, progress, manifest
    verdict and the layouts it resumes on; exit 1 once a byte is flipped, 0 again with --no-verify."""
    import json

    from megatron_cola.cli.checkpoint_info import main

    ckpt = _copy(base_run, tmp_path)
    assert main([str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(ckpt / "iter_0000004") and info["kind"] == "training"
    assert (info["iteration"], info["consumed_samples"], info["consumed_tokens"]) == (4, 64, 64 * 64)
    layout = {k: info[k] for k in ("tp_size", "dp_size", "world_size", "zero_stage", "dtype")}
    assert layout == {"tp_size": 1, "dp_size": 2, "world_size": 2, "zero_stage": 1, "dtype": "fp32"}
    assert info["bytes"] == sum(p.stat().st_size for p in (ckpt / "iter_0000004").iterdir())
    assert info["manifest"]["status"] == "verified" and info["manifest"]["problems"] == []
    # The run wrote the layout-free optimizer state (optim_tpNN.pt): it resumes on any layout.
    assert any(f.startswith("optim_tp") for f in info["files"])
    resumable = info["resumable"]
    assert (resumable["tp_size"], resumable["zero_stage"], resumable["dp_size"]) == ("any", "any", "any")

    assert main([str(ckpt / "iter_0000002")]) == 0  # one checkpoint directory, human-readable
    out = capsys.readouterr().out
    assert "iteration:    2, consumed samples 32 (2048 tokens)" in out
    assert "layout:       TP 1, DP 2, world 2, ZeRO-1, fp32" in out and "manifest:     verified" in out
    assert "resumable on: any layout (per-parameter optimizer state)" in out

    bad = ckpt / "iter_0000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _flip_byte(bad, 4000)
    assert main([str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert "manifest:     failed" in out and f"{bad} does not match its xxh3_128 checksum" in out
    assert main([str(ckpt), "--no-verify"]) == 0
    assert "not verified (--no-verify)" in capsys.readouterr().out
    assert main([str(tmp_path / "nothing")]) == 2
