"""Loss curves of several runs in one PNG, against tokens, training FLOPs or training hours, and a table.

    python tools/plot_runs.py --run CoLA=runs/cola --run "full rank=runs/full" --x tokens --x flops \\
        --output loss.png [--table table.md]

Each run is given as ``LABEL=DIR`` or just ``DIR``: the ``--save`` directory the launchers write (its
``tensorboard/metrics.jsonl`` is read) or the ``--tensorboard-dir`` itself. Training loss is drawn as a
line (smoothed with ``--smooth``), validation loss as markers; one panel per ``--x``:

- ``tokens``: consumed tokens;
- ``flops``: training FLOPs so far, ``flops_per_token`` (the analytic count of ``model/flops.py`` that the
  log's TFLOP/s use, written in every ``throughput`` record) × consumed tokens;
- ``hours``: training time so far, the sum of the logged step times (evaluation and saving excluded).

``--table FILE.md`` writes a markdown table per run: parameters (from the run's checkpoint, when the
directory holds one), tokens, training FLOPs, training time and the final validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.errors import DataError, MegatronColaError

METRICS = "metrics.jsonl"
AXES = {"tokens": "tokens", "flops": "training FLOPs", "hours": "training hours"}


@dataclass
class RunLog:
    """What one run's ``metrics.jsonl`` says: per-iteration losses, tokens, FLOPs/token and step times."""

    label: str
    metrics_dir: str
    run_dir: str | None  # the --save directory when it holds a checkpoint
    train: dict[int, tuple[int, float]] = field(default_factory=dict)  # iteration -> (tokens, loss)
    validation: dict[int, tuple[int, float]] = field(default_factory=dict)
    step_ms: dict[int, tuple[int, float]] = field(default_factory=dict)  # log iteration -> (previous, ms)
    flops_per_token: float | None = None

    def seconds_at(self, iteration: int) -> float:
        """Training time up to ``iteration``: each logged interval's mean step time × its steps."""
        total = 0.0
        for it, (prev, ms) in sorted(self.step_ms.items()):
            if prev >= iteration:
                break
            total += (min(it, iteration) - prev) * ms / 1000
        return total

    def x(self, axis: str, iteration: int, tokens: int) -> float:
        if axis == "tokens":
            return tokens
        if axis == "flops":
            if self.flops_per_token is None:
                raise DataError(
                    f"{os.path.join(self.metrics_dir, METRICS)} has no flops_per_token (its run predates "
                    "it): plot it with --x tokens or --x hours"
                )
            return self.flops_per_token * tokens
        return self.seconds_at(iteration) / 3600


def metrics_dir_of(directory: str) -> str:
    """The directory holding ``metrics.jsonl``: ``directory`` itself or its ``tensorboard/``."""
    for candidate in (directory, os.path.join(directory, "tensorboard")):
        if os.path.exists(os.path.join(candidate, METRICS)):
            return candidate
    raise DataError(
        f"no {METRICS} in {directory} or {os.path.join(directory, 'tensorboard')}: pass a run's --save "
        "directory (the launchers log to SAVE/tensorboard) or its --tensorboard-dir"
    )


def read_run(spec: str) -> RunLog:
    """Read ``LABEL=DIR`` (or ``DIR``). A resumed run appends to the same file; later records for the
    same iteration replace earlier ones."""
    label, _, directory = spec.rpartition("=") if "=" in spec else (None, "", spec)
    directory = directory.rstrip("/") or directory
    label = label or os.path.basename(os.path.abspath(directory))
    metrics_dir = metrics_dir_of(directory)
    run_dir = next(
        (
            d
            for d in (directory, os.path.dirname(os.path.abspath(metrics_dir)))
            if os.path.exists(os.path.join(d, "latest"))
        ),
        None,
    )
    run = RunLog(label, metrics_dir, run_dir)
    path = os.path.join(metrics_dir, METRICS)
    throughput: dict[int, float] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not JSON ({e})") from e
            kind = rec.get("kind")
            if kind in ("train", "validation") and "lm_loss" in rec:
                getattr(run, kind)[rec["iteration"]] = (rec["consumed_tokens"], rec["lm_loss"])
            elif kind == "throughput":
                throughput[rec["iteration"]] = rec["step_time_ms"]
                if rec.get("flops_per_token") is not None:
                    run.flops_per_token = float(rec["flops_per_token"])
    prev = min(run.train, default=1) - 1  # a resumed run's log starts after its first iteration
    for it in sorted(throughput):
        run.step_ms[it] = (prev, throughput[it])
        prev = it
    return run


def smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average (``alpha`` = 0: the values themselves)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _params(run: RunLog) -> str:
    """``5.38M (1.25M)``: all parameters (non-embedding) of the run's latest checkpoint, or ``n/a``."""
    if run.run_dir is None:
        return "n/a"
    from megatron_cola.checkpoint import model_file_name
    from megatron_cola.checkpoint.io import safe_torch_load
    from megatron_cola.checkpoint.layout import resolve_checkpoint_dir
    from megatron_cola.config import ModelArgs

    path = os.path.join(resolve_checkpoint_dir(run.run_dir), model_file_name(0))
    if not os.path.exists(path):
        return "n/a"
    meta = safe_torch_load(path, mmap=True)
    args = ModelArgs.from_dict(meta["args"])  # as trained: the embedding padded to its vocab multiple
    total = args.num_params()
    return f"{_si(total)} ({_si(total - 2 * args.vocab_size * args.hidden_size)})"


def markdown_table(runs: list[RunLog]) -> str:
    """One row per run: params, tokens, FLOPs, training time, final validation loss (and perplexity)."""
    lines = [
        "| run | params (non-embedding) | tokens | training FLOPs | training time | final valid loss (ppl) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        last = max(run.train, default=0)
        tokens = run.train[last][0] if last else 0
        flops = _si(run.flops_per_token * tokens) if run.flops_per_token is not None else "n/a"
        if run.validation:
            it = max(run.validation)
            loss = run.validation[it][1]
            valid = f"{loss:.3f} ({math.exp(min(loss, 20)):.0f}) at iteration {it}"
        else:
            valid = "n/a"
        seconds = run.seconds_at(last)
        lines.append(
            f"| {run.label} | {_params(run)} | {_si(tokens)} | {flops} | {seconds:.0f} s | {valid} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[RunLog], axes: list[str], output: str, title: str, alpha: float) -> None:
    """Draw one panel per x axis and write ``output`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(7 * len(axes), 4.5), dpi=120, squeeze=False)
    for ax, axis in zip(panels[0], axes):
        for run in runs:
            if not run.train:
                continue
            its = sorted(run.train)
            xs = [run.x(axis, it, run.train[it][0]) for it in its]
            (line,) = ax.plot(
                xs, smooth([run.train[it][1] for it in its], alpha), label=f"{run.label} (train)"
            )
            if run.validation:
                vits = sorted(run.validation)
                vx = [run.x(axis, it, run.validation[it][0]) for it in vits]
                ax.plot(
                    vx,
                    [run.validation[it][1] for it in vits],
                    "o",
                    color=line.get_color(),
                    label=f"{run.label} (valid)",
                )
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("lm loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{output}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="plot_runs.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", action="append", required=True, help="LABEL=DIR or DIR (repeatable)")
    p.add_argument(
        "--x",
        action="append",
        default=None,
        help="x axis: tokens, flops or hours (repeat or comma-separate: side-by-side panels; default tokens)",
    )
    p.add_argument("--output", default="loss_vs_tokens.png")
    p.add_argument("--table", default=None, help="also write a markdown table of the runs here")
    p.add_argument("--smooth", type=float, default=0.6, help="EMA factor for the training curve (0 = raw)")
    p.add_argument("--title", default=None, help="figure title (default: 'Training loss vs ...')")
    ns = p.parse_args(argv)
    axes = [a.strip() for spec in (ns.x or ["tokens"]) for a in spec.split(",") if a.strip()]
    for axis in axes:
        if axis not in AXES:
            p.error(f"--x {axis!r}: choose from {', '.join(AXES)}")
    title = ns.title or "Training loss vs " + " and ".join(AXES[a] for a in axes)
    try:
        runs = [read_run(spec) for spec in ns.run]
        plot(runs, axes, ns.output, title, ns.smooth)
        print(f"wrote {ns.output}")
        if ns.table:
            table = markdown_table(runs)
            atomic_write_text(ns.table, table)
            print(table, end="")
            print(f"wrote {ns.table}")
    except (MegatronColaError, OSError) as e:
        print(f"plot_runs.py: error: {e}", file=sys.stderr)
        return 1
    return 0
