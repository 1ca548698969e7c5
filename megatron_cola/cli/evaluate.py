"""Evaluate a checkpoint or a Hugging Face folder with lm-evaluation-harness and write the results as JSON.

python tools/evaluate.py --load DIR --tasks NAMES [--include-path DIR] [--output FILE.json]
                         [--iteration N] [--batch-size 16] [--limit N] [--num-fewshot K] [--device cpu]

DIR is a checkpoint directory (the --save of pretrain_cola.py; exported to a temporary HF folder) or a
folder written by tools/convert_to_hf.py (or any LLaMA folder). NAMES is a comma-separated list of lm-eval
tasks or groups: the bundled ``sample_cloze`` (held-out Shakespeare: multiple-choice cloze and perplexity)
works offline with no setup; lm-eval's own tasks (hellaswag, arc_easy, ...) need their datasets. The JSON
goes to --output, by default next to the checkpoint (DIR/lm_eval_iter_NNNNNNN.json or, for an HF folder,
DIR/lm_eval_results.json).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_cola.errors import MegatronColaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--load", required=True, help="checkpoint directory or Hugging Face folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks/groups, e.g. sample_cloze")
    p.add_argument(
        "--include-path", action="append", default=None, help="directory of extra task YAMLs (repeatable)"
    )
    p.add_argument("--output", default=None, help="results JSON (default: next to the checkpoint)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (< 1: a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1)")
    p.add_argument("--log-samples", action="store_true", help="also write every request and its scores")
    a = p.parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megatron_cola.convert.evaluate import evaluate, results_table

    try:
        record, path = evaluate(
            a.load,
            tasks,
            include_paths=a.include_path,
            output=a.output,
            iteration=a.iteration,
            batch_size=a.batch_size,
            device=a.device,
            limit=limit,
            num_fewshot=a.num_fewshot,
            log_samples=a.log_samples,
        )
    except (MegatronColaError, OSError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    print(results_table(record))
    print(f"wrote {path} ({record['evaluation_time_s']:.1f} s)")
    return 0
