"""Resume on another layout (issue 18): 4 steps on L1 and a save, 4 more on L2, against 8 straight steps
(CPU, gloo, debug model). Steps 5-8 agree within 2e-4; the same resume with --no-load-optim differs by
more (the comparison measures the optimizer state).

Every run of one world size shares one launch (``tests/run_many.py``): the save runs on L1 and the
resumes on 2 processes, then the resumes on 1 process. The fp32 layouts compute the same losses (within
1e-5: tests/test_training_tp.py, tests/test_training.py), so one 8-step fp32 run is the reference of
every fp32 case and its own save at iteration 4 the L1 checkpoint of the cases that start on DP2 ZeRO-1.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_cola.checkpoint import CheckpointReader
from megatron_cola.cli.convert_to_hf import main as convert_to_hf
from megatron_cola.errors import CheckpointError
from megatron_cola.training.checkpointing import check_reshardable, describe_layout, layout_changed

from .conftest import ROOT, dist_env, synthetic_args

TOL = 2e-4


@dataclasses.dataclass(frozen=True)
class Layout:
    nproc: int
    flags: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"np{self.nproc}" + "".join(self.flags).replace("-", "_")


def layout(nproc: int, *flags: str) -> Layout:
    return Layout(nproc, flags)


DP2_Z1 = layout(2, "--zero-stage", "1")
BF16_DP2_Z2 = layout(2, "--zero-stage", "2", "--bf16")
REFERENCES = (DP2_Z1, BF16_DP2_Z2)  # 8 straight steps, saved at 4


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    l1: Layout
    l2: Layout
    control: bool = False  # also resume with --no-load-optim

    @property
    def reference(self) -> Layout:
        return BF16_DP2_Z2 if "--bf16" in self.l1.flags else DP2_Z1


CASES = [
    Case("DP2 ZeRO-1 -> DP1 ZeRO-1", DP2_Z1, layout(1, "--zero-stage", "1")),
    Case("DP2 ZeRO-2 -> DP2 ZeRO-3", layout(2, "--zero-stage", "2"), layout(2, "--zero-stage", "3")),
    Case("DP2 ZeRO-3 -> DP1 ZeRO-0", layout(2, "--zero-stage", "3"), layout(1, "--zero-stage", "0"), True),
    Case(
        "TP2 x DP1 -> TP1 x DP2",
        layout(2, "--zero-stage", "1", "--tensor-model-parallel-size", "2"),
        DP2_Z1,
    ),
    Case(
        "TP1 x DP2 -> TP2 x DP1",
        DP2_Z1,
        layout(2, "--zero-stage", "1", "--tensor-model-parallel-size", "2"),
        True,
    ),
    Case(
        "split-rank TP2 -> bottleneck TP2",
        layout(2, "--zero-stage", "1", "--tensor-model-parallel-size", "2"),
        layout(2, "--zero-stage", "1", "--tensor-model-parallel-size", "2", "--cola-tp-scheme", "bottleneck"),
    ),
    # bf16 at ZeRO-3 computes differently (2.7e-4 off ZeRO-1/2 after 8 steps): ZeRO-2 -> ZeRO-1.
    Case("bf16 DP2 ZeRO-2 -> DP2 ZeRO-1", BF16_DP2_Z2, layout(2, "--zero-stage", "1", "--bf16")),
]


def run_args(prefix: str, flags: tuple[str, ...], *extra: str) -> list[str]:
    args = synthetic_args(prefix, "--train-iters", "8", *flags, *extra)
    args[args.index("--vocab-size") + 1] = "255"  # 256 ids: divisible by TP 2 after padding
    return args


def launch(runs: list[dict], nproc: int, out, spec) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    spec.write_text(json.dumps({"out": str(out), "runs": runs}))
    cmd = [sys.executable, str(ROOT / "tests" / "run_many.py"), str(spec)]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *cmd[1:],
        ]
    proc = subprocess.run(cmd, env=dist_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    logs: dict[str, str] = {}
    for part in proc.stdout.split("=== run ")[1:]:
        key, _, text = part.partition("\n")
        logs[key] = logs.get(key, "") + text
    results = {k: {int(i): v for i, v in losses.items()} for k, losses in json.loads(out.read_text()).items()}
    return results, logs


@pytest.mark.slow
def test_resume_on_other_layouts(synthetic_prefix: str, tmp_path, capsys) -> None:
    ckpt = {}  # L1 layout -> checkpoint directory holding its iteration-4 save
    first: list[dict] = []
    for ref in REFERENCES:
        ckpt[ref] = tmp_path / f"ref{ref.key}"
        args = run_args(synthetic_prefix, ref.flags, "--save", str(ckpt[ref]), "--save-interval", "4")
        first.append({"key": f"ref{ref.key}", "args": args})
    for case in CASES:
        if case.l1 not in ckpt:
            ckpt[case.l1] = tmp_path / f"l1{case.l1.key}"
            args = run_args(
                synthetic_prefix, case.l1.flags, "--save", str(ckpt[case.l1]), "--exit-interval", "4"
            )
            first.append({"key": f"l1{case.l1.key}", "args": args})
    resumes: dict[int, list[dict]] = {1: [], 2: []}
    for i, case in enumerate(CASES):
        latest = [str(ckpt[case.l1]), "iter_0000004"] if case.l1 in REFERENCES else None
        variants = [("", ())] + ([("control", ("--no-load-optim",))] if case.control else [])
        for tag, extra in variants:
            args = run_args(synthetic_prefix, case.l2.flags, "--load", str(ckpt[case.l1]), *extra)
            resumes[case.l2.nproc].append({"key": f"{tag}{i}", "args": args, "latest": latest})
    assert all(c.l1.nproc == 2 for c in CASES)  # the save runs share the 2-process launch
    results, logs = launch(first + resumes[2], 2, tmp_path / "out2.json", tmp_path / "spec2.json")
    more, more_logs = launch(resumes[1], 1, tmp_path / "out1.json", tmp_path / "spec1.json")
    results.update(more)
    logs.update(more_logs)

    for i, case in enumerate(CASES):
        ref = results[f"ref{case.reference.key}"]
        got = results[str(i)]
        assert sorted(got) == [5, 6, 7, 8], (case.name, got)
        diffs = {it: abs(got[it] - ref[it]) for it in range(5, 9)}
        assert max(diffs.values()) < TOL, (case.name, diffs)
        assert "optimizer state resharded (105 tensors; step 4)" in logs[str(i)], logs[str(i)][-2000:]
        if case.control:
            fresh = results[f"control{i}"]
            worst = max(abs(fresh[it] - ref[it]) for it in range(5, 9))
            assert worst > TOL, (case.name, worst)
            assert "--no-load-optim: the optimizer starts afresh" in logs[f"control{i}"]
    assert (
        "> resuming a TP1 x DP2 ZeRO-1 checkpoint on TP2 x DP1 ZeRO-1: optimizer state resharded "
        "(105 tensors; step 4)" in logs["4"]
    )

    # The bf16 run's fp32 master weights reach the HF export (by default); the module's are bf16-rounded.
    exported = {}
    for source, flag in (("master", []), ("module", ["--from-module"])):
        hf = tmp_path / f"hf_{source}"
        argv = ["--load", str(ckpt[BF16_DP2_Z2]), "--save", str(hf), "--dtype", "fp32", "--no-tokenizer"]
        assert convert_to_hf([*argv, *flag]) == 0
        said = "the fp32 master weights (optim_tpNN.pt)" if source == "master" else "the module's weights"
        assert f"weights: {said}" in capsys.readouterr().out
        exported[source] = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
    master, module = exported["master"], exported["module"]
    assert sorted(master) == sorted(module)
    assert all(torch.equal(module[k], master[k].bfloat16().float()) for k in master)
    assert max(float((master[k] - module[k]).abs().max()) for k in master) > 0


def test_layout_changes_and_their_description() -> None:
    saved = {"tp": 1, "dp": 2, "zero": 1, "scheme": "split-rank", "split_dims": {}}
    now = {**saved, "tp": 2, "dp": 1, "split_dims": {"lm_head.weight": 0}}
    assert describe_layout(saved) == "TP1 x DP2 ZeRO-1"
    assert describe_layout(now, with_scheme=True) == "TP2 (split-rank) x DP1 ZeRO-1"
    assert layout_changed(saved, now) and not layout_changed(saved, dict(saved))
    assert layout_changed(saved, {**saved, "zero": 3}) and layout_changed(saved, {**saved, "dp": 4})
    assert layout_changed(now, {**now, "scheme": "bottleneck"})  # another cut of the same TP size
    assert layout_changed(now, {**now, "split_dims": {"lm_head.weight": 1}})
    # Fields a checkpoint predates count as unchanged.
    assert not layout_changed({**saved, "dp": None, "split_dims": None}, {**saved, "dp": 4, "split_dims": {}})


def test_layout_change_without_optim_files_keeps_the_refusals(tmp_path) -> None:
    (tmp_path / "iter_0000004").mkdir()
    reader = CheckpointReader(str(tmp_path), 4)
    tp1 = {"tp": 1, "dp": 2, "zero": 1, "scheme": "split-rank", "split_dims": {}}
    tp2 = {"tp": 2, "dp": 1, "zero": 1, "scheme": "split-rank", "split_dims": {"lm_head.weight": 0}}
    with pytest.raises(CheckpointError, match="tensor-model-parallel size 1, this run uses 2.*optim_tpNN.pt"):
        check_reshardable(reader, tp1, tp2)
    with pytest.raises(CheckpointError, match="--cola-tp-scheme split-rank, this run uses bottleneck"):
        check_reshardable(reader, tp2, {**tp2, "scheme": "bottleneck"})
    # ZeRO stage and DP size: check_compatible's rules (--no-load-optim) apply, as before.
    assert check_reshardable(reader, tp1, {**tp1, "zero": 3, "dp": 1}) is False
    assert check_reshardable(reader, tp1, dict(tp1)) is False
    (tmp_path / "iter_0000004" / "optim_tp00.pt").write_bytes(b"")
    assert check_reshardable(reader, tp1, tp2) is True
