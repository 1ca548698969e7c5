"""Generation throughput and peak memory of CoLA vs full rank at the same size, prompt length and batch.

python tools/bench_inference.py [--model-size 60M] [--batch-size 8] [--prompt-length 128] [--new-tokens 128]
                                [--dtype fp32|bf16] [--device cpu|cuda] [--variants cola,full,llama]
                                [--repeats 3] [--rounds 1] [--threads N] [--json]

Each variant runs in its own subprocess (random init is fine: only shapes matter) and reports
- ``generate tok/s``: new tokens per second of ``generate()`` (greedy, KV cache, prefill included),
  median of ``--repeats`` calls after a warm-up (with ``--rounds N`` each variant runs N times,
  alternating with the others, keeping the best figures: meant to damp a busy machine's noise);
- ``prefill ms``: one forward over the prompt batch (last-position logits only, as in ``generate()``);
- ``peak MiB``: CPU, the process's peak RSS at the end (``getrusage`` ``ru_maxrss``) minus its RSS just
  before the model is built, so weights + KV cache + activations + allocator slack (PyTorch
  allocations are invisible to ``tracemalloc``); CUDA, ``torch.cuda.max_memory_allocated``.

Variants: ``cola`` and ``full`` both run Megatron-CoLA's ``ColaForCausalLM`` (``cola_rank=None`` gives
dense maps), so they share every line of code but the linear maps; ``llama`` is ``transformers``'
``LlamaForCausalLM`` at the full-rank shapes, for reference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from megatron_cola.convert.inference_bench import DTYPES, VARIANTS, run_variant


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="60M")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="cola,full", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed generate() calls per run (median)")
    p.add_argument("--rounds", type=int, default=1, help="runs per variant, alternating; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    from megatron_cola.config import SIZES, ModelArgs

    if a.model_size not in SIZES:
        p.error(f"unknown --model-size {a.model_size!r}; allowed: {list(SIZES)}")
    try:
        ModelArgs.from_size(a.model_size)
    except ValueError as e:
        p.error(str(e))

    if a.worker:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        result = run_variant(
            a.worker, a.model_size, a.batch_size, a.prompt_length, a.new_tokens, a.dtype, a.device, a.repeats
        )
        print("RESULT " + json.dumps(result))
        return 0

    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; allowed: {list(VARIANTS)}")
    passthrough = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(a).items()
        if k not in ("json", "worker", "variants", "rounds") and v is not None
    ]
    best: dict[str, dict] = {}
    for _ in range(a.rounds):  # variants alternate, so a busy machine slows each about equally
        for v in variants:
            cmd = [sys.executable, "-m", __name__, *passthrough, "--worker", v]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"bench_inference: variant {v} failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
                return 1
            r = json.loads(lines[-1][len("RESULT ") :])
            if v not in best:
                best[v] = r
                continue
            kept = best[v]
            if r["generate_tok_s"] > kept["generate_tok_s"]:
                kept["generate_tok_s"] = r["generate_tok_s"]
            kept["prefill_ms"] = min(kept["prefill_ms"], r["prefill_ms"])
            kept["peak_mib"] = min(kept["peak_mib"], r["peak_mib"])
    results = [best[v] for v in variants]
    if a.json:
        for r in results:
            print(json.dumps(r))
        return 0
    ref = next((r for r in results if r["variant"] == "full"), results[0])
    print(
        f"size {a.model_size}, batch {a.batch_size}, prompt {a.prompt_length}, new tokens {a.new_tokens}, "
        f"{a.dtype} on {a.device}; peak = {results[0]['peak_kind']}"
    )
    print("| variant | params | weights MiB | generate tok/s | vs full | prefill ms | peak MiB | vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['params'] / 1e6:.1f}M | {r['weights_mib']:.0f} "
            f"| {r['generate_tok_s']:.1f} | {r['generate_tok_s'] / ref['generate_tok_s']:.2f}x "
            f"| {r['prefill_ms']:.0f} "
            f"| {r['peak_mib']:.0f} | {ref['peak_mib'] / r['peak_mib']:.2f}x less |"
        )
    return 0


if __name__ == "__main__":  # the --worker subprocess (python -m megatron_cola.cli.bench_inference)
    sys.exit(main())
