"""Training throughput of CoLA vs full rank (and recomputation modes).

    python tools/bench_train.py --model-size 60M --seq-length 256 --micro-batch-size 4 \
        --variants full-rank cola cola:full cola:cola-m [--steps 5 --rounds 3] [--json out.json]

Each variant is ``cola`` or ``full-rank``, optionally with ``:RECOMPUTE``, and optionally ``+grouped``
(q/k/v and gate/up as one GEMM: ``ModelArgs.grouped_projections``), e.g. ``cola:cola-m+grouped``.
``--variants`` takes names separated by spaces or commas (``--variants cola,full-rank``).
``--compile`` compiles each decoder block with ``megatron_cola.model.compile.compile_blocks``, in
``--compile-mode`` (default, reduce-overhead = CUDA graphs, max-autotune, max-autotune-no-cudagraphs).
One step is forward, backward and a fused AdamW update (torch's) of a single micro-batch, under bf16
autocast (``--dtype fp32`` to disable).

Order (``--order``): ``interleaved`` (the default on CPU) builds every variant first and times them in
alternating rounds, so that a busy machine slows them alike; ``sequential`` (the default on CUDA) builds,
times and frees one variant before the next, so each variant's peak memory is its own. On CUDA, peak
memory is reported only where it is the variant's own (``sequential``, or a single variant). One
variant per process, e.g. ``--variants cola:cola-m`` (what benchmarks/gpu_suite.sh runs), isolates
it completely (allocator, compile caches). The table gives the median tokens/s and the ratio to the first
variant; on CUDA also MFU against the card's dense bf16 peak (``--peak-tflops`` to override) and peak
memory (GiB). ``--json`` also records, per variant, the optimizer that ran, the peak used and the device.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time

import torch

from megatron_cola.config import ModelArgs
from megatron_cola.model import build_model
from megatron_cola.model.compile import COMPILE_MODES, compile_blocks
from megatron_cola.model.flops import training_flops_per_token
from megatron_cola.training.engine import optimizer_name
from megatron_cola.training.logging_utils import device_name, peak_tflops


def parse_variant(spec: str, size: str, vocab: int | None, seq: int) -> tuple[str, ModelArgs]:
    """``(spec, ModelArgs)``; exits with a message on an unknown variant or size."""
    base, plus, option = spec.partition("+")
    name, _, recompute = base.partition(":")
    if name not in ("cola", "full-rank") or (plus and option != "grouped"):
        raise SystemExit(
            f"bench_train.py: variant {spec!r}: expected cola or full-rank[:RECOMPUTE][+grouped]"
        )
    overrides = {"recompute": recompute or "none", "max_seq_length": seq, "grouped_projections": bool(plus)}
    if vocab:
        overrides["vocab_size"] = vocab
    try:
        return spec, ModelArgs.from_size(size, full_rank=name == "full-rank", **overrides)
    except ValueError as e:
        raise SystemExit(f"bench_train.py: error: {e}") from e


def _free(device: torch.device) -> None:
    """Release what a freed variant left behind, so the next one starts from an empty device."""
    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the freed model
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="60M")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["full-rank", "cola", "cola:full", "cola:cola-m"],
        help="variants to measure; one (e.g. --variants cola) to run each in a process of its own",
    )
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=None, help="override the 32000 vocab")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--order",
        choices=["auto", "interleaved", "sequential"],
        default="auto",
        help="interleaved rounds (all variants resident) or one variant at a time, freed before the "
        "next (each peak memory its own); auto: interleaved on CPU, sequential on CUDA",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s for MFU (default: the GPU's dense bf16 peak by its exact name)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode")
    p.add_argument("--json", default=None, help="also write the results here")
    ns = p.parse_args(argv)
    ns.variants = [v for spec in ns.variants for v in spec.split(",") if v]
    device = torch.device(ns.device)
    order = ns.order if ns.order != "auto" else ("sequential" if device.type == "cuda" else "interleaved")
    own_peak = device.type == "cuda" and (order == "sequential" or len(ns.variants) == 1)
    torch.manual_seed(0)
    tokens = torch.randint(
        0,
        32000 if not ns.vocab_size else ns.vocab_size,
        (ns.micro_batch_size, ns.seq_length + 1),
        device=device,
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if ns.dtype == "bf16" else contextlib.nullcontext()
    )

    cuda_graphs = ns.compile and ns.compile_mode == "reduce-overhead"

    def build(spec: str) -> dict:
        name, args = parse_variant(spec, ns.model_size, ns.vocab_size, ns.seq_length)
        model = build_model(args, seed=0, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
        fwd = compile_blocks(model, mode=ns.compile_mode) if ns.compile else model
        return {"name": name, "args": args, "model": model, "opt": opt, "fwd": fwd, "times": []}

    def step(run: dict) -> None:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = run["fwd"](tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_round(run: dict) -> None:
        sync()
        t0 = time.perf_counter()
        for _ in range(ns.steps):
            step(run)
        sync()
        run["times"].append((time.perf_counter() - t0) / ns.steps)

    def result(run: dict, peak_gib: float | None) -> dict:
        """What is kept of a run once its model and optimizer are freed."""
        return {
            "name": run["name"],
            "args": run["args"],
            "times": run["times"],
            "optimizer": optimizer_name(run["opt"]),
            "peak_gib": peak_gib,
        }

    def peak_since_reset() -> float | None:
        return torch.cuda.max_memory_allocated(device) / 2**30 if own_peak else None

    results = []
    if order == "sequential":
        for spec in ns.variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # after the previous variant was freed
            run = build(spec)
            for _ in range(ns.warmup):
                step(run)
            for _ in range(ns.rounds):
                timed_round(run)
            results.append(result(run, peak_since_reset()))
            del run
            _free(device)
    else:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [build(spec) for spec in ns.variants]
        for run in runs:
            for _ in range(ns.warmup):
                step(run)
        for _ in range(ns.rounds):
            for run in runs:
                timed_round(run)
        results = [result(run, peak_since_reset()) for run in runs]  # one variant: its own peak

    peak = peak_tflops(device, ns.peak_tflops)
    gpu = device_name(device)
    tok_per_step = ns.micro_batch_size * ns.seq_length
    base = None
    rows = []
    for run in results:
        tps = tok_per_step / statistics.median(run["times"])
        base = base or tps
        flops = training_flops_per_token(run["args"], ns.seq_length)
        rows.append(
            {
                "variant": run["name"],
                "tokens_per_s": tps,
                "ratio": tps / base,
                "params_m": run["args"].num_params() / 1e6,
                "tflops": flops * tps / 1e12,
                "mfu": flops * tps / 1e12 / peak if peak else None,
                "peak_tflops": peak,
                "peak_gib": run["peak_gib"],
                "optimizer": run["optimizer"],
                "device_name": gpu,
                "order": order,
            }
        )
    print(
        f"{ns.model_size}, seq {ns.seq_length}, micro-batch {ns.micro_batch_size}, {ns.dtype}, "
        f"{device.type}{f' (compiled, {ns.compile_mode})' if ns.compile else ''}; "
        f"median of {ns.rounds} rounds x {ns.steps} steps"
        f" ({order}); {gpu}; optimizer {rows[0]['optimizer']}"
        + (f"; MFU against {peak:g} TFLOP/s" if peak else "")
    )
    print(f"| variant | params | tokens/s | vs {rows[0]['variant']} | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        print(
            f"| {r['variant']} | {r['params_m']:.1f}M | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
            f"{r['tflops']:.2f} | {mfu} | {mem} |"
        )
    if ns.json:
        tmp = f"{ns.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"config": {**vars(ns), "order": order, "device_name": gpu}, "rows": rows}, f, indent=2)
        os.replace(tmp, ns.json)
