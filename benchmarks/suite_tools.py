#!/usr/bin/env python3
"""Helpers of ``benchmarks/gpu_suite.sh``: the environment, FusedAdam's build, synthetic data, the report.

    python benchmarks/suite_tools.py env OUT_DIR/env.json --mode full|smoke [--target DIR]
    python benchmarks/suite_tools.py build-ops [--check]
    python benchmarks/suite_tools.py data PREFIX [--vocab-size V] [--documents N]
    python benchmarks/suite_tools.py report OUT_DIR

``env`` records the device, torch, CUDA and where DeepSpeed is imported from, and fails (exit 2) when a
full run's Python has no CUDA (a carried ``.venv`` with a CPU torch, say). ``build-ops`` JIT-builds and
loads DeepSpeed's FusedAdam (``--check``: only looks its builder up). ``data`` writes a Megatron-format
``PREFIX.bin/.idx`` of random token documents (the GPU machine has no network). ``report`` reads the
results of the steps this run recorded in ``OUT_DIR/steps.tsv`` (``NAME.json`` from
``tools/bench_train.py``, ``NAME/metrics.jsonl`` from ``pretrain_cola.py``), writes ``suite.json`` and
``suite.md`` (atomically), and prints the markdown tables: one row per measured variant, then the ratios
the GPU targets of issue 16 name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import numpy as np

from megatron_cola.atomic_io import atomic_write_text


def make_data(prefix: str, vocab_size: int, documents: int, seed: int = 0) -> None:
    from megatron_cola.data import MMapIndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size < 65500 else np.int32
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for _ in range(documents):
        builder.add_item(rng.integers(1, vocab_size, size=int(rng.integers(200, 2000))))
        builder.end_document()
    builder.finalize(prefix + ".idx")


def write_env(path: str, mode: str, target: str | None) -> int:
    """``env.json``; 2 when a full run's torch has no CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.executable,
        "mode": mode,
    }
    try:
        import deepspeed

        env["deepspeed"] = f"{deepspeed.__version__} ({os.path.dirname(deepspeed.__file__)})"
        if target and not os.path.abspath(deepspeed.__file__).startswith(os.path.abspath(target) + os.sep):
            env["deepspeed"] += " (not from the wheelhouse)"
    except Exception as e:  # the pretrain step then fails and says why; the benchmarks still run
        env["deepspeed"] = f"not importable: {e}"
    atomic_write_text(path, json.dumps(env, indent=2) + "\n")
    print("> " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if mode == "full" and not cuda:
        print(
            f"gpu_suite.sh: {sys.executable} imports torch {torch.__version__} without CUDA; set PYTHON to "
            "a Python with a CUDA torch (a carried .venv holds a CPU one)",
            file=sys.stderr,
        )
        return 2
    return 0


def build_ops(check_only: bool) -> int:
    """JIT-build and load DeepSpeed's FusedAdam (into ``TORCH_EXTENSIONS_DIR``), so that the training
    step later finds it built; ``check_only``: look its builder up only (the CPU rehearsal)."""
    t0 = time.perf_counter()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builder = accelerator.create_op_builder("FusedAdamBuilder")
    name = type(builder).__name__ if builder is not None else None
    if check_only or builder is None:
        print(f"> {accelerator.device_name()} accelerator, FusedAdam builder {name}: not built (--check)")
        return 0
    builder.load()
    print(f"> FusedAdam built and loaded in {time.perf_counter() - t0:.0f} s ({name})")
    return 0


def _steps(out_dir: str) -> list[dict[str, str]]:
    path = os.path.join(out_dir, "steps.tsv")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            name, status, seconds = line.rstrip("\n").split("\t")
            out.append({"step": name, "status": status, "seconds": seconds})
    return out


def _peak(row: dict[str, Any], tflops_key: str) -> float | None:
    """The peak TFLOP/s an MFU was computed with: the row's own, else TFLOP/s / MFU."""
    if row.get("peak_tflops") is not None:
        return row["peak_tflops"]
    if row.get("mfu"):
        return row[tflops_key] / row["mfu"]
    return None


def _bench_rows(out_dir: str, step: str, env: dict[str, Any]) -> list[dict[str, Any]]:
    path = os.path.join(out_dir, f"{step}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        result = json.load(f)
    cfg = result["config"]
    return [
        {
            "step": step,
            "variant": f"{cfg['model_size']} {r['variant']}",
            "compile_mode": cfg.get("compile_mode", "default") if cfg["compile"] else "eager",
            "micro_batch": cfg["micro_batch_size"],
            "tokens_per_s": r["tokens_per_s"],
            "mfu": r["mfu"],
            "peak_tflops": _peak(r, "tflops"),
            "peak_gib": r["peak_gib"],
            # tools/bench_train.py steps torch's fused AdamW (older JSON does not say so)
            "optimizer": r.get("optimizer", "torch AdamW (fused)"),
            "device": r.get("device_name", env.get("device")),
        }
        for r in result["rows"]
    ]


def _pretrain_rows(out_dir: str, step: str, env: dict[str, Any]) -> list[dict[str, Any]]:
    path = os.path.join(out_dir, step, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    last = None
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "throughput":
                last = rec
    if last is None:
        return []
    log_path = os.path.join(out_dir, f"{step}.log")
    log = open(log_path).read() if os.path.exists(log_path) else ""
    compiled = re.search(r"> compiled \d+ decoder blocks \(torch\.compile[^)]*?(?:, mode=([\w-]+))?\)", log)
    optimizer = last.get("optimizer")
    if optimizer is None:  # runs that do not record it: what the engine's log and device tell
        if "FusedAdam unavailable" in log:
            optimizer = "torch AdamW (fused; FusedAdam failed to build)"
        else:
            optimizer = "torch AdamW (fused)" if env.get("device") == "cpu" else "DeepSpeed FusedAdam"
    return [
        {
            "step": step,
            "variant": f"pretrain_cola.py iteration {last['iteration']}",
            "compile_mode": (compiled.group(1) or "default") if compiled else "eager",
            "micro_batch": None,
            "tokens_per_s": last["tokens_per_second"],
            "mfu": last.get("mfu"),
            "peak_tflops": _peak(last, "tflops_per_device"),
            "peak_gib": last["peak_memory_gb"],
            "optimizer": optimizer,
            "device": last.get("device_name", env.get("device")),
            "lm_loss": last["lm_loss"],
        }
    ]


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios issue 16's GPU targets name, from this run's rows (``None`` where a step is missing)."""
    by_step = {r["step"]: r for r in rows}
    full, cola, cola_m = (by_step.get(s, {}) for s in ("headline_full_rank", "headline_cola", "cola_m"))
    out = [
        ("CoLA / full-rank tokens/s", _ratio(cola.get("tokens_per_s"), full.get("tokens_per_s")), ">=", 1.9),
        ("full-rank MFU", full.get("mfu"), ">=", 0.45),
        ("CoLA-M / CoLA peak memory", _ratio(cola_m.get("peak_gib"), cola.get("peak_gib")), "<=", 0.45),
        ("CoLA-M / CoLA tokens/s", _ratio(cola_m.get("tokens_per_s"), cola.get("tokens_per_s")), ">=", 0.9),
    ]
    result = []
    for name, value, op, goal in out:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        shown = f"{100 * goal:.0f}%" if "MFU" in name else f"{goal:g}x"
        result.append({"what": name, "value": value, "target": f"{op} {shown}", "met": met})
    modes = [r for r in rows if r["step"] == "headline_cola" or r["step"].startswith("cola_mode_")]
    if modes:
        best = max(modes, key=lambda r: r["tokens_per_s"])
        result.append(
            {
                "what": f"fastest compile mode for CoLA: {best['compile_mode']} ({best['step']})",
                "value": _ratio(best["tokens_per_s"], cola.get("tokens_per_s")),
                "target": "tokens/s vs headline_cola",
                "met": None,
            }
        )
    return result


def report(out_dir: str) -> str:
    env_path = os.path.join(out_dir, "env.json")
    env = json.load(open(env_path)) if os.path.exists(env_path) else {}
    steps = _steps(out_dir)  # only what this run recorded: nothing stale is read
    rows: list[dict[str, Any]] = []
    for s in steps:
        rows += _bench_rows(out_dir, s["step"], env) + _pretrain_rows(out_dir, s["step"], env)
    goals = targets(rows)
    lines = [
        f"GPU suite: {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
        f"DeepSpeed {env.get('deepspeed', '?')}, mode {env.get('mode', '?')}",
        "",
        "| step | variant | compile mode | micro-batch | tokens/s | MFU (of peak TFLOP/s) | peak GiB "
        "| optimizer | GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = _fmt(r["mfu"], ".1f", 100, "%")
        if r["peak_tflops"] is not None:
            mfu += f" (of {r['peak_tflops']:.0f})"
        lines.append(
            f"| {r['step']} | {r['variant']} | {r['compile_mode']} | {r['micro_batch'] or ''} | "
            f"{r['tokens_per_s']:.0f} | {mfu} | {_fmt(r['peak_gib'], '.1f')} | {r['optimizer']} | "
            f"{r['device']} |"
        )
    marks = {True: "met", False: "missed", None: ""}
    lines += ["", "| target | value | goal | |", "|---|---|---|---|"]
    for g in goals:
        value = (
            _fmt(g["value"], ".1f", 100, "%") if "MFU" in g["what"] else _fmt(g["value"], ".2f", suffix="x")
        )
        lines.append(f"| {g['what']} | {value} | {g['target']} | {marks[g['met']]} |")
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
    md = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out_dir, "suite.md"), md)
    summary = {"env": env, "rows": rows, "targets": goals, "steps": steps}
    atomic_write_text(os.path.join(out_dir, "suite.json"), json.dumps(summary, indent=2) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="record the environment; exit 2 when a full run has no CUDA")
    e.add_argument("path")
    e.add_argument("--mode", choices=["full", "smoke"], default="full")
    e.add_argument("--target", default=None, help="where the wheelhouse was installed")
    b = sub.add_parser("build-ops", help="JIT-build DeepSpeed's FusedAdam")
    b.add_argument("--check", action="store_true", help="only look the builder up")
    d = sub.add_parser("data", help="write a synthetic PREFIX.bin/.idx")
    d.add_argument("prefix")
    d.add_argument("--vocab-size", type=int, default=32000)
    d.add_argument("--documents", type=int, default=2000)
    r = sub.add_parser("report", help="collect the suite's results into suite.json and suite.md")
    r.add_argument("out_dir")
    ns = p.parse_args(argv)
    if ns.command == "env":
        return write_env(ns.path, ns.mode, ns.target)
    if ns.command == "build-ops":
        return build_ops(ns.check)
    if ns.command == "data":
        make_data(ns.prefix, ns.vocab_size, ns.documents)
    else:
        print(report(ns.out_dir), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
