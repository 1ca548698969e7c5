"""Parameters, training FLOPs per token and measured saved activations of a CoLA / LLaMA size.

python tools/model_info.py --model-size 1B [--full-rank] [--recompute cola-m] [--seq-length 256] [--json]
python tools/model_info.py --table          # markdown table of every paper size, CoLA vs full rank
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_cola.config import RECOMPUTE_CHOICES, SIZES, ModelArgs
from megatron_cola.model.activation_memory import measure_saved_activations
from megatron_cola.model.flops import training_flops_per_token

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_info(args: ModelArgs, seq_length: int, dtype: str = "bf16", measure_seq: int = 64) -> dict:
    """Everything ``model_info.py`` prints for one configuration, as a dict."""
    saved = measure_saved_activations(args, args.recompute, seq_length=measure_seq, dtype=DTYPES[dtype])
    return {
        "params": args.num_params(),
        "flops_per_token": training_flops_per_token(args, seq_length),
        "saved_activation_elements_per_token_per_layer": saved.elements_per_token,
        "saved_activation_bytes_per_token_per_layer": saved.bytes_per_token,
        "saved_activation_dtype": dtype,
        "recompute": args.recompute,
        "full_rank": args.full_rank,
        "seq_length": seq_length,
        "hidden_size": args.hidden_size,
        "cola_rank": None if args.full_rank else args.cola_rank,
        "num_layers": args.num_layers,
    }


def table(seq_length: int, dtype: str) -> str:
    rows = [
        "| size | variant | params | train GFLOPs/token | FLOPs vs full "
        "| saved/token/layer none | full | cola-m |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        if size == "debug":
            continue
        full = ModelArgs.from_size(size, full_rank=True)
        full_flops = training_flops_per_token(full, seq_length)
        for full_rank in (True, False):
            args = ModelArgs.from_size(size, full_rank=full_rank)
            modes = ["none", "full"] + ([] if full_rank else ["cola-m"])
            saved = {
                m: measure_saved_activations(args, m, dtype=DTYPES[dtype]).elements_per_token for m in modes
            }
            flops = training_flops_per_token(args, seq_length)
            cells = [f"{saved[m]:.0f}" if m in saved else "n/a" for m in ("none", "full", "cola-m")]
            rows.append(
                f"| {size} | {'full rank' if full_rank else f'CoLA r={args.cola_rank}'} "
                f"| {args.num_params() / 1e6:.1f}M | {flops / 1e9:.2f} | {flops / full_flops:.2f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="1B", help=f"one of {list(SIZES)}")
    p.add_argument("--full-rank", action="store_true", help="the LLaMA baseline instead of CoLA")
    p.add_argument("--cola-rank", type=int, default=None, help="override the size's rank")
    p.add_argument("--recompute", default="none", choices=RECOMPUTE_CHOICES)
    p.add_argument("--seq-length", type=int, default=256, help="sequence length for attention FLOPs")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of measured activations")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", action="store_true", help="markdown table of all paper sizes")
    ns = p.parse_args(argv)
    if ns.table:
        print(table(ns.seq_length, ns.dtype))
        return
    overrides = {"recompute": ns.recompute}
    if ns.cola_rank is not None:
        overrides["cola_rank"] = ns.cola_rank
    try:
        args = ModelArgs.from_size(ns.model_size, full_rank=ns.full_rank, **overrides)
    except ValueError as e:
        p.error(str(e))
    info = model_info(args, ns.seq_length, ns.dtype)
    if ns.json:
        print(json.dumps(info))
        return
    variant = "full rank" if args.full_rank else f"CoLA (rank {args.cola_rank})"
    print(f"model {ns.model_size} {variant}, recompute={args.recompute}, seq {ns.seq_length}")
    print(f"  parameters:                 {info['params']:,} ({info['params'] / 1e6:.1f}M)")
    print(f"  training FLOPs per token:   {info['flops_per_token'] / 1e9:.3f} GFLOPs (fwd+bwd)")
    e, b = (
        info["saved_activation_elements_per_token_per_layer"],
        info["saved_activation_bytes_per_token_per_layer"],
    )
    print(f"  saved for backward / token / layer: {e:.0f} elements, {b:.0f} bytes ({ns.dtype}, measured)")
