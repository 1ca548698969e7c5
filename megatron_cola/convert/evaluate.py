"""Downstream evaluation with lm-evaluation-harness (``lm_eval``) of a checkpoint or a Hugging Face folder.

``evaluate(load, tasks)`` exports a checkpoint directory to a temporary HF folder (``export_checkpoint``,
fp32) or takes an HF folder as it is, runs ``lm_eval.simple_evaluate`` with the ``hf`` model type
(``trust_remote_code=True``: CoLA exports carry their own modeling code) on the tasks given, and writes the
results as JSON, atomically: by default next to the checkpoint (``{load}/lm_eval_iter_NNNNNNN.json``, or
``{load}/lm_eval_results.json`` for an HF folder).

Tasks are found in the bundled task directory (``lm_eval_tasks/``: ``sample_cloze``, built from the sample
corpus, see ``sample_cloze.py``), in the ``include_paths`` given, and in lm-eval's own task registry. The
registry (~15k YAML files) is only indexed when a task is not found in the first two, as that takes tens
of seconds.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import time
from typing import Any

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.checkpoint.layout import read_latest
from megatron_cola.errors import CheckpointError, ConfigError

BUNDLED_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
# What of lm-eval's result dict goes into our JSON (``samples`` only with ``log_samples``).
RESULT_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better")
RESULT_KEYS += ("n-samples", "config", "samples")


def is_hf_folder(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def default_output(load: str, iteration: int | None = None) -> str:
    """Where the results go without ``--output``: beside the checkpoint's ``latest``/iteration, or in the
    HF folder."""
    if is_hf_folder(load):
        return os.path.join(load, "lm_eval_results.json")
    tag = f"iter_{iteration:07d}" if iteration is not None else read_latest(load)
    if tag is None:
        raise CheckpointError(
            f"{load} is neither a Hugging Face folder (no config.json) nor a checkpoint directory "
            "(no 'latest')"
        )
    return os.path.join(load, f"lm_eval_{tag}.json")


def task_manager(
    tasks: list[str], include_paths: list[str] | None = None, include_defaults: bool = True
) -> Any:
    """An ``lm_eval`` ``TaskManager`` that knows every name in ``tasks``, or ``ConfigError`` naming the
    unknown ones (with the closest known names). lm-eval's own registry is searched only when
    ``include_defaults`` and a name is not in the bundled and included directories."""
    from lm_eval.tasks import TaskManager

    paths = [BUNDLED_TASKS]
    for path in include_paths or []:
        if not os.path.isdir(path):
            raise ConfigError(f"--include-path {path} is not a directory of lm-eval task YAML files")
        paths.append(os.path.abspath(path))
    manager = TaskManager(include_path=paths, include_defaults=False)
    if include_defaults and not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        listed = "; ".join(
            f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items()
        )
        raise ConfigError(
            f"unknown lm-eval task(s): {listed}. The bundled task is sample_cloze; add task YAML "
            "directories with --include-path"
        )
    return manager


def run_lm_eval(
    hf_dir: str,
    tasks: list[str],
    manager: Any,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of the HF folder ``hf_dir`` (model type ``hf``, fp32)."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": hf_dir, "trust_remote_code": True, "dtype": "float32"},
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        log_samples=log_samples,
        task_manager=manager,
    )
    if out is None:  # only on non-zero ranks of a distributed lm-eval run
        raise ConfigError("lm_eval returned no results (run tools/evaluate.py as a single process)")
    return out


def evaluate(
    load: str,
    tasks: list[str],
    *,
    include_paths: list[str] | None = None,
    output: str | None = None,
    iteration: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> tuple[dict[str, Any], str]:
    """Evaluate checkpoint directory or HF folder ``load`` on ``tasks``; returns ``(record, output path)``.

    The record holds lm-eval's ``results`` (per task and metric, e.g. ``"acc,none"``), ``groups``,
    ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples`` and ``config``, plus
    ``source`` (what was evaluated) and ``evaluation_time_s``.
    """
    if not tasks:
        raise ConfigError("--tasks names no task (e.g. --tasks sample_cloze or --tasks hellaswag,arc_easy)")
    if not os.path.exists(load):
        raise ConfigError(f"--load {load} does not exist (a checkpoint directory or a Hugging Face folder)")
    hf = is_hf_folder(load)
    if hf and iteration is not None:
        raise ConfigError(f"--iteration applies to checkpoint directories; {load} is a Hugging Face folder")
    output = output or default_output(load, iteration)
    manager = task_manager(tasks, include_paths)
    start = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size, device=device, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples
    )
    if hf:
        result = run_lm_eval(load, tasks, manager, **kwargs)
    else:
        from megatron_cola.convert.export import export_checkpoint

        with tempfile.TemporaryDirectory(prefix="megatron_cola_eval_") as tmp:
            hf_dir = export_checkpoint(load, os.path.join(tmp, "hf"), iteration, dtype="fp32")
            result = run_lm_eval(hf_dir, tasks, manager, **kwargs)
    record: dict[str, Any] = {
        "source": {
            "load": os.path.abspath(load),
            "kind": "hf_folder" if hf else "checkpoint",
            "checkpoint": None
            if hf
            else (f"iter_{iteration:07d}" if iteration is not None else read_latest(load)),
        },
        "tasks": list(tasks),
        **{k: result[k] for k in RESULT_KEYS if k in result},
        "evaluation_time_s": round(time.perf_counter() - start, 3),
    }
    write_json(record, output)
    return record, output


def write_json(record: dict[str, Any], path: str) -> None:
    """Atomically write ``record`` as indented JSON (values JSON cannot hold become strings)."""
    from lm_eval.utils import handle_non_serializable

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=handle_non_serializable) + "\n")


def results_table(record: dict[str, Any]) -> str:
    """lm-eval's markdown table of the results (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    table = make_table(record)
    if record.get("groups"):
        table += "\n" + make_table(record, "groups")
    return table
