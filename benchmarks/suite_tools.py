#!/usr/bin/env python3
"""Helpers of ``benchmarks/gpu_suite.sh``: synthetic pre-training data, and the suite's report.

    python benchmarks/suite_tools.py data PREFIX [--vocab-size V] [--documents N]
    python benchmarks/suite_tools.py report OUT_DIR

``data`` writes a Megatron-format ``PREFIX.bin/.idx`` of random token documents with the package's
``MMapIndexedDatasetBuilder`` (the GPU machine has no network, so the suite makes its own data).
``report`` reads every step's result in ``OUT_DIR`` (``bench_*.json`` from ``tools/bench_train.py``,
``pretrain_*/metrics.jsonl`` from ``pretrain_cola.py``, ``steps.tsv`` with each step's status) and
writes ``suite.json`` and ``suite.md`` (atomically), and prints the markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
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


def _bench_rows(out_dir: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "bench_*.json"))):
        step = os.path.basename(path)[: -len(".json")]
        with open(path) as f:
            result = json.load(f)
        cfg = result["config"]
        for r in result["rows"]:
            rows.append(
                {
                    "step": step,
                    "what": f"{cfg['model_size']} {r['variant']}"
                    + (" compiled" if cfg["compile"] else " eager"),
                    "micro_batch": cfg["micro_batch_size"],
                    "tokens_per_s": r["tokens_per_s"],
                    "ratio": r["ratio"],
                    "mfu": r["mfu"],
                    "peak_gib": r["peak_gib"],
                }
            )
    return rows


def _pretrain_rows(out_dir: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "pretrain_*", "metrics.jsonl"))):
        step = os.path.basename(os.path.dirname(path))
        last = None
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") == "throughput":
                    last = rec
        if last is not None:
            rows.append(
                {
                    "step": step,
                    "what": f"pretrain_cola.py (DeepSpeed) iteration {last['iteration']}",
                    "micro_batch": None,
                    "tokens_per_s": last["tokens_per_second"],
                    "ratio": None,
                    "mfu": last.get("mfu"),
                    "peak_gib": last["peak_memory_gb"],
                    "lm_loss": last["lm_loss"],
                }
            )
    return rows


def _statuses(out_dir: str) -> list[dict[str, str]]:
    path = os.path.join(out_dir, "steps.tsv")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            name, status, seconds = line.rstrip("\n").split("\t")
            out.append({"step": name, "status": status, "seconds": seconds})
    return out


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def report(out_dir: str) -> str:
    statuses = _statuses(out_dir)
    order = {s["step"]: i for i, s in enumerate(statuses)}  # the order the suite ran them in
    rows = _bench_rows(out_dir) + _pretrain_rows(out_dir)
    rows.sort(key=lambda r: order.get(r["step"], len(order)))
    env_path = os.path.join(out_dir, "env.json")
    env = json.load(open(env_path)) if os.path.exists(env_path) else {}
    lines = [
        f"GPU suite: {env.get('device', '?')}, torch {env.get('torch', '?')}, mode {env.get('mode', '?')}",
        "",
        "| step | what | micro-batch | tokens/s | vs first of step | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['what']} | {r['micro_batch'] or ''} | {r['tokens_per_s']:.0f} | "
            f"{_fmt(r['ratio'], '.2f', suffix='x')} | {_fmt(r['mfu'], '.1f', 100, '%')} | "
            f"{_fmt(r['peak_gib'], '.1f')} |"
        )
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in statuses]
    md = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out_dir, "suite.md"), md)
    summary = {"env": env, "rows": rows, "steps": statuses}
    atomic_write_text(os.path.join(out_dir, "suite.json"), json.dumps(summary, indent=2) + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write a synthetic PREFIX.bin/.idx")
    d.add_argument("prefix")
    d.add_argument("--vocab-size", type=int, default=32000)
    d.add_argument("--documents", type=int, default=2000)
    r = sub.add_parser("report", help="collect the suite's results into suite.json and suite.md")
    r.add_argument("out_dir")
    ns = p.parse_args(argv)
    if ns.command == "data":
        make_data(ns.prefix, ns.vocab_size, ns.documents)
    else:
        print(report(ns.out_dir), end="")


if __name__ == "__main__":
    main()
