"""Counts, progress bar and summary line of the preprocessing engine (megatron_cola.data.preprocess)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MAX_REPORTED_BAD_LINES", "BadLines", "Progress", "Stats", "summarize"]

MAX_REPORTED_BAD_LINES = 50


@dataclass
class Stats:
    """Counts over the chunks of a partition (or of the whole run)."""

    docs: int = 0
    input_bytes: int = 0
    tokens: int = 0
    blank: int = 0
    bad: int = 0
    empty: dict[str, int] = field(default_factory=dict)
    tokens_per_key: dict[str, int] = field(default_factory=dict)
    tokenize_seconds: float = 0.0

    def add(self, r: Any) -> None:
        self.docs += r.docs
        self.input_bytes += r.input_bytes
        self.tokens += r.num_tokens
        self.blank += r.blank
        self.bad += len(r.bad)
        for k, v in r.empty.items():
            self.empty[k] = self.empty.get(k, 0) + v
        for k, t in r.tokens.items():
            self.tokens_per_key[k] = self.tokens_per_key.get(k, 0) + int(t.size)
        self.tokenize_seconds += r.tokenize_seconds

    def merge(self, other: Stats) -> None:
        self.docs += other.docs
        self.input_bytes += other.input_bytes
        self.tokens += other.tokens
        self.blank += other.blank
        self.bad += other.bad
        for k, v in other.empty.items():
            self.empty[k] = self.empty.get(k, 0) + v
        for k, v in other.tokens_per_key.items():
            self.tokens_per_key[k] = self.tokens_per_key.get(k, 0) + v
        self.tokenize_seconds += other.tokenize_seconds


class BadLines:
    """Prints the first ``MAX_REPORTED_BAD_LINES`` bad lines as warnings through ``write``, then one line
    saying that only the count follows (with or without ``--quiet``: a corpus of bad lines never floods
    the terminal; the summary line has the total)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write
        self.count = 0

    def report(self, bad: list[tuple[str, str, str]]) -> None:
        for where, reason, what in bad:
            self.count += 1
            if self.count <= MAX_REPORTED_BAD_LINES:
                self.write(f"warning: {where}: {reason} ({what} skipped)")
            elif self.count == MAX_REPORTED_BAD_LINES + 1:
                self.write("warning: more bad lines; only the count is reported from now on")


class Progress:
    """tqdm bar over input bytes with docs/s and tokens/s, plus bad-line reporting."""

    def __init__(self, total_bytes: int, log_interval: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="preprocess",
            file=sys.stderr,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        self.log_interval = max(1, log_interval)
        self.t0 = time.perf_counter()
        self.docs = 0
        self.tokens = 0
        self.bad = BadLines(lambda line: self.bar.write(line, file=sys.stderr))
        self._next_log = self.log_interval

    def update(self, docs: int, nbytes: int, tokens: int, bad: list[tuple[str, str, str]]) -> None:
        self.bad.report(bad)
        self.docs += docs
        self.tokens += tokens
        if self.docs >= self._next_log:
            self._next_log = self.docs + self.log_interval
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(
                f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tok/s", refresh=False
            )
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def summarize(
    stats: Any, wall: float, workers: int, partitions: int, outputs: list[str], dtype: np.dtype
) -> dict:
    """The summary dict of a run (``stats`` is a ``preprocess.Stats``), after printing its one-line form."""
    wall = max(wall, 1e-9)
    summary = {
        "documents": stats.docs,
        "tokens": stats.tokens,
        "input_bytes": stats.input_bytes,
        "seconds": wall,
        "docs_per_s": stats.docs / wall,
        "mb_per_s": stats.input_bytes / 1e6 / wall,
        "tokens_per_s": stats.tokens / wall,
        "bad_lines": stats.bad,
        "blank_lines": stats.blank,
        "empty_documents": stats.empty,
        "tokenize_seconds": stats.tokenize_seconds,
        "workers": workers,
        "partitions": partitions,
        "outputs": outputs,
        "dtype": dtype.name,
    }
    extra = ""
    if workers <= 1 and partitions == 1:
        summary["outside_tokenization_fraction"] = max(0.0, 1.0 - stats.tokenize_seconds / wall)
        extra = f", {100 * summary['outside_tokenization_fraction']:.1f}% of the time outside tokenization"
    empty = sum(stats.empty.values())
    print(
        f"done: {stats.docs} documents, {stats.tokens} tokens, {stats.input_bytes / 1e6:.2f} MB "
        f"in {wall:.2f}s ({summary['docs_per_s']:,.0f} docs/s, {summary['mb_per_s']:.2f} MB/s, "
        f"{summary['tokens_per_s']:,.0f} tokens/s{extra}); "
        f"skipped {stats.bad} bad lines, recorded {empty} empty documents; "
        f"wrote {', '.join(outputs)} ({dtype.name})",
        flush=True,
    )
    return summary
