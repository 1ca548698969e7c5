#!/usr/bin/env python3
"""Loss-vs-tokens curves of several runs in one PNG (CoLA vs full rank is the usual figure).

    python tools/plot_runs.py --run CoLA=runs/cola/tb --run "full rank=runs/full/tb" --output loss.png

Each run is a ``--tensorboard-dir`` of ``pretrain_cola.py`` (it holds ``metrics.jsonl``), given as
``LABEL=DIR`` or just ``DIR``. Training loss is drawn as a line (smoothed with ``--smooth``), validation
loss as markers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(directory: str) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(tokens, loss)], "validation": [...]}`` from a run's ``metrics.jsonl``.

    A resumed run appends to the same file; later records for the same iteration replace earlier ones.
    """
    path = os.path.join(directory, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass the --tensorboard-dir of a pretrain_cola.py run")
    series: dict[str, dict[int, tuple[int, float]]] = {"train": {}, "validation": {}}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e})") from e
            if rec.get("kind") in series and "lm_loss" in rec:
                series[rec["kind"]][rec["iteration"]] = (rec["consumed_tokens"], rec["lm_loss"])
    return {k: [v[i] for i in sorted(v)] for k, v in series.items()}


def smooth(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="LABEL=DIR or DIR (repeatable)")
    p.add_argument("--output", default="loss_vs_tokens.png")
    p.add_argument("--smooth", type=float, default=0.6, help="EMA factor for the training curve (0 = raw)")
    p.add_argument("--title", default="Training loss vs tokens")
    ns = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for spec in ns.run:
        label, _, directory = spec.rpartition("=") if "=" in spec else (os.path.basename(spec), "", spec)
        try:
            data = read_metrics(directory)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"plot_runs.py: error: {e}")
        if data["train"]:
            tokens, losses = zip(*data["train"])
            (line,) = ax.plot(tokens, smooth(list(losses), ns.smooth), label=f"{label} (train)")
            if data["validation"]:
                vt, vl = zip(*data["validation"])
                ax.plot(vt, vl, "o", color=line.get_color(), label=f"{label} (valid)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("lm loss")
    ax.set_title(ns.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = ns.output + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, ns.output)
    print(f"wrote {ns.output}")


if __name__ == "__main__":
    main()
