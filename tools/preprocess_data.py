#!/usr/bin/env python
"""Tokenize JSONL documents into Megatron ``.bin/.idx`` datasets (Megatron-LM's flags and output format).

    python tools/preprocess_data.py --input data/sample/train.jsonl --output-prefix data/sample/train \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/tokenizer/sample_32k.model \\
        --append-eod --workers 2

Writes ``{output-prefix}_{key}_document.bin/.idx`` for every ``--json-keys`` key, MMIDIDX v1, uint16 tokens
when the vocabulary is below 65500 else int32, byte-for-byte what Megatron-LM's builder writes for the same
ids. One JSON object per line; ``--input`` takes ``.jsonl``/``.jsonl.gz`` files and globs.

* Bad lines (not UTF-8, not JSON, not an object, a key missing or not a string, tokenizer error) are
  reported as ``file:line: reason``, skipped and counted; ``--strict`` makes the first one fatal (exit 1).
* Documents that tokenize to nothing are dropped and counted (no empty documents in the index).
* ``--workers N`` tokenizes in N processes (``--workers 1`` runs in-process); order is always the input
  order, so the output does not depend on the worker count.
* ``--partitions P`` splits the input into P contiguous byte ranges (whole files for ``.gz``) processed by
  parallel processes with ``workers // P`` workers each, then merged; the result is identical to P=1.
* Outputs are written under temporary names and renamed when complete (``.idx`` last), so an interrupted
  run never leaves a pair that looks valid.

Without ``--split-sentences`` (not supported here, as in Megatron's default GPT path) every document is
tokenized whole, newlines included; ``--keep-newlines`` is accepted for command-line compatibility.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import queue as queue_module
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_cola.data.indexed_dataset import (  # noqa: E402
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    commit_dataset,
    data_file_path,
    index_file_path,
    remove_dataset,
)
from megatron_cola.data.tokenizers import TOKENIZER_TYPES, AbstractTokenizer, build_tokenizer  # noqa: E402
from megatron_cola.errors import DataError  # noqa: E402

CHUNK_LINES = 1024
CHUNK_BYTES = 1 << 18
MAX_REPORTED_BAD_LINES = 50


class StrictError(DataError):
    """A bad input line under ``--strict``."""


# ---------------------------------------------------------------------------------------------- input plan
@dataclass
class WorkUnit:
    """Lines of ``path`` in bytes ``[start, end)`` (``end=None``: to the end), from line ``first_line``."""

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``--input`` (globs expanded and sorted, duplicates dropped, order kept)."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"--input {pattern!r} matches no files")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"--input {pattern!r}: no such file")
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _is_gzip(path: str) -> bool:
    return path.endswith(".gz")


def _cut_points(path: str, offsets: list[int]) -> list[tuple[int, int]]:
    """For each byte offset, the start of the next line at or after it and that line's number."""
    out = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos, line = 0, 1
        for target in offsets:
            if target <= 0:
                out.append((0, 1))
                continue
            f.seek(target - 1)
            tail = f.readline()  # from the byte before target to the end of that line
            cut = min(target - 1 + len(tail), size)
            f.seek(pos)
            remaining = cut - pos
            while remaining > 0:
                block = f.read(min(remaining, 1 << 24))
                line += block.count(b"\n")
                remaining -= len(block)
            pos = cut
            out.append((cut, line))
    return out


def plan_partitions(files: list[str], partitions: int) -> list[list[WorkUnit]]:
    """Split the inputs into ``partitions`` contiguous groups of about equal bytes (empty groups dropped)."""
    if partitions <= 1:
        return [[WorkUnit(f) for f in files]]
    sizes = [os.path.getsize(f) for f in files]
    total = max(sum(sizes), 1)
    targets = [total * k // partitions for k in range(1, partitions)]
    groups: list[list[WorkUnit]] = [[] for _ in range(partitions)]
    cum = 0
    for path, size in zip(files, sizes):
        inside = [t - cum for t in targets if cum < t < cum + size]
        if _is_gzip(path) or not inside:
            part = sum(1 for t in targets if t <= cum + size // 2)
            groups[part].append(WorkUnit(path))
        else:
            cuts = [(0, 1), *_cut_points(path, inside), (size, -1)]
            for (start, line), (end, _) in zip(cuts[:-1], cuts[1:]):
                if end > start:
                    part = sum(1 for t in targets if t <= cum + start)
                    groups[part].append(WorkUnit(path, start, end, line))
        cum += size
    return [g for g in groups if g]


def iter_chunks(units: list[WorkUnit]) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """``(path, [(line number, raw line bytes), ...])`` chunks of at most CHUNK_LINES lines / ~CHUNK_BYTES."""
    for unit in units:
        opener = gzip.open if _is_gzip(unit.path) else open
        with opener(unit.path, "rb") as f:
            if unit.start:
                f.seek(unit.start)
            pos = unit.start
            line_no = unit.first_line
            chunk: list[tuple[int, bytes]] = []
            size = 0
            for raw in f:
                if unit.end is not None and pos >= unit.end:
                    break
                pos += len(raw)
                chunk.append((line_no, raw))
                size += len(raw)
                line_no += 1
                if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
                    yield unit.path, chunk
                    chunk, size = [], 0
            if chunk:
                yield unit.path, chunk


# ---------------------------------------------------------------------------------------------- workers
@dataclass
class ChunkResult:
    """What a worker returns for a chunk: per key the concatenated tokens and per-document lengths."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    docs: int = 0
    input_bytes: int = 0
    blank: int = 0
    empty: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, int, str]] = field(default_factory=list)
    tokenize_seconds: float = 0.0


_TOKENIZER: AbstractTokenizer | None = None
_CONFIG: dict = {}


def _init_worker(
    tokenizer_args: tuple[str, str | None, int | None], config: dict, pool: bool = False
) -> None:
    global _TOKENIZER, _CONFIG
    if pool:  # one process per core already: no extra threads inside Hugging Face tokenizers
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = build_tokenizer(*tokenizer_args)
    _CONFIG = config


def _parse_line(raw: bytes, keys: list[str]) -> tuple[list[str] | None, str | None]:
    """(texts per key, None) or (None, reason)."""
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return None, f"JSON {type(obj).__name__} instead of an object"
    texts = []
    for key in keys:
        if key not in obj:
            present = ", ".join(list(obj)[:5])
            return None, f"missing key {key!r} (keys: {present or 'none'})"
        value = obj[key]
        if not isinstance(value, str):
            return None, f"key {key!r} holds a {type(value).__name__}, expected a string"
        texts.append(value)
    return texts, None


def process_chunk(chunk: tuple[str, list[tuple[int, bytes]]]) -> ChunkResult:
    """Parse and tokenize one chunk (runs in a worker, or in-process for ``--workers 1``)."""
    path, lines = chunk
    tok = _TOKENIZER
    assert tok is not None, "worker not initialised"
    keys: list[str] = _CONFIG["keys"]
    dtype = _CONFIG["dtype"]
    eod = tok.eod if _CONFIG["append_eod"] else None

    result = ChunkResult(tokens={}, lengths={}, empty=dict.fromkeys(keys, 0))
    good_lines: list[int] = []
    texts_per_key: list[list[str]] = [[] for _ in keys]
    for line_no, raw in lines:
        result.input_bytes += len(raw)
        if not raw.strip():
            result.blank += 1
            continue
        texts, reason = _parse_line(raw, keys)
        if texts is None:
            result.bad.append((path, line_no, reason or "unreadable"))
            continue
        good_lines.append(line_no)
        for k, t in enumerate(texts):
            texts_per_key[k].append(t)

    ids_per_key: list[list[list[int] | None]] = []
    failed: dict[int, str] = {}
    for texts in texts_per_key:
        t0 = time.perf_counter()
        try:
            ids: list[list[int] | None] = list(tok.tokenize_batch(texts))
        except Exception:  # find the offending documents one by one
            ids = []
            for j, t in enumerate(texts):
                try:
                    ids.append(tok.tokenize(t))
                except Exception as exc:  # noqa: BLE001 - any tokenizer failure is a bad line
                    ids.append(None)
                    failed.setdefault(j, f"tokenizer failed: {exc}")
        result.tokenize_seconds += time.perf_counter() - t0
        ids_per_key.append(ids)
    for j in sorted(failed):
        result.bad.append((path, good_lines[j], failed[j]))
    result.bad.sort(key=lambda b: b[1])

    result.docs = len(good_lines) - len(failed)
    for k, key in enumerate(keys):
        flat: list[int] = []
        lengths: list[int] = []
        for j, ids in enumerate(ids_per_key[k]):
            if j in failed or ids is None:
                continue
            if not ids:
                result.empty[key] += 1
                continue
            flat.extend(ids)
            n = len(ids)
            if eod is not None:
                flat.append(eod)
                n += 1
            lengths.append(n)
        result.tokens[key] = np.array(flat, dtype=dtype)
        result.lengths[key] = np.array(lengths, dtype=np.int32)
    return result


def _ordered_results(
    chunks: Iterator[tuple[str, list[tuple[int, bytes]]]], workers: int, init_args: tuple
) -> Iterator[ChunkResult]:
    """Results in input order; ``workers > 1`` uses a process pool with bounded look-ahead."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield process_chunk(chunk)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(*init_args, True)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------- one partition
@dataclass
class Stats:
    docs: int = 0
    input_bytes: int = 0
    tokens: int = 0
    blank: int = 0
    bad: int = 0
    empty: dict[str, int] = field(default_factory=dict)
    tokenize_seconds: float = 0.0

    def add(self, r: ChunkResult) -> None:
        self.docs += r.docs
        self.input_bytes += r.input_bytes
        self.tokens += sum(int(t.size) for t in r.tokens.values())
        self.blank += r.blank
        self.bad += len(r.bad)
        for k, v in r.empty.items():
            self.empty[k] = self.empty.get(k, 0) + v
        self.tokenize_seconds += r.tokenize_seconds

    def merge(self, other: Stats) -> None:
        self.docs += other.docs
        self.input_bytes += other.input_bytes
        self.tokens += other.tokens
        self.blank += other.blank
        self.bad += other.bad
        for k, v in other.empty.items():
            self.empty[k] = self.empty.get(k, 0) + v
        self.tokenize_seconds += other.tokenize_seconds


def run_partition(
    units: list[WorkUnit],
    out_prefixes: dict[str, str],
    workers: int,
    init_args: tuple,
    strict: bool,
    on_result: Callable[[ChunkResult], None],
) -> Stats:
    """Tokenize ``units`` into one ``.bin/.idx`` pair per key at ``out_prefixes[key]``."""
    dtype = init_args[1]["dtype"]
    builders = {key: MMapIndexedDatasetBuilder(data_file_path(p), dtype) for key, p in out_prefixes.items()}
    stats = Stats()
    results = _ordered_results(iter_chunks(units), workers, init_args)
    try:
        for result in results:
            if result.bad and strict:
                path, line, reason = result.bad[0]
                raise StrictError(f"{path}:{line}: {reason}")
            for key, builder in builders.items():
                builder.add_documents(result.tokens[key], result.lengths[key])
            stats.add(result)
            on_result(result)
        for key, builder in builders.items():
            builder.finalize(index_file_path(out_prefixes[key]))
    except BaseException:
        results.close()  # stops a worker pool at once
        for builder in builders.values():
            builder.abort()
        for p in out_prefixes.values():
            remove_dataset(p)
        raise
    return stats


def _partition_process(
    k: int,
    units: list[WorkUnit],
    out_prefixes: dict[str, str],
    workers: int,
    init_args: tuple,
    strict: bool,
    queue,
) -> None:
    def on_result(r: ChunkResult) -> None:
        queue.put(("progress", k, r.docs, r.input_bytes, sum(int(t.size) for t in r.tokens.values()), r.bad))

    try:
        stats = run_partition(units, out_prefixes, workers, init_args, strict, on_result)
    except StrictError as exc:
        queue.put(("fatal", k, str(exc)))
        sys.exit(1)
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        queue.put(("fatal", k, f"partition {k} failed: {type(exc).__name__}: {exc}"))
        sys.exit(1)
    queue.put(("done", k, stats))


# ---------------------------------------------------------------------------------------------- driver
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
        self.bad = 0
        self._next_log = self.log_interval

    def update(self, docs: int, nbytes: int, tokens: int, bad: list[tuple[str, int, str]]) -> None:
        for path, line, reason in bad:
            self.bad += 1
            if self.bad <= MAX_REPORTED_BAD_LINES:
                self.bar.write(f"warning: {path}:{line}: {reason} (line skipped)", file=sys.stderr)
            elif self.bad == MAX_REPORTED_BAD_LINES + 1:
                self.bar.write(
                    "warning: more bad lines; only the count is reported from now on", file=sys.stderr
                )
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


def output_prefixes(output_prefix: str, keys: list[str]) -> dict[str, str]:
    return {key: f"{output_prefix}_{key}_document" for key in keys}


def run(args: argparse.Namespace) -> dict:
    """Preprocess per ``args``; returns summary statistics (also printed). Raises StrictError / OSError."""
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    dtype = np.dtype(best_fitting_dtype(tokenizer.vocab_size))
    config = {"keys": list(args.json_keys), "dtype": dtype, "append_eod": args.append_eod}
    init_args = ((args.tokenizer_type, args.tokenizer_model, args.vocab_size), config)
    finals = output_prefixes(args.output_prefix, args.json_keys)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    pid = os.getpid()
    tmps = {key: f"{p}.tmp-{pid}" for key, p in finals.items()}

    plan = plan_partitions(files, args.partitions)
    total_bytes = sum(os.path.getsize(f) for f in files)
    progress = Progress(total_bytes, args.log_interval) if not args.quiet else None

    def report(docs: int, nbytes: int, tokens: int, bad: list[tuple[str, int, str]]) -> None:
        if progress is not None:
            progress.update(docs, nbytes, tokens, bad)
        else:
            for path, line, reason in bad:
                print(f"warning: {path}:{line}: {reason} (line skipped)", file=sys.stderr)

    def on_result(r: ChunkResult) -> None:
        report(r.docs, r.input_bytes, sum(int(t.size) for t in r.tokens.values()), r.bad)

    t0 = time.perf_counter()
    part_prefixes: list[dict[str, str]] = []
    try:
        if len(plan) == 1:
            stats = run_partition(plan[0], tmps, args.workers, init_args, args.strict, on_result)
        else:
            stats = Stats()
            part_prefixes = [
                {key: f"{p}.part{k}.tmp-{pid}" for key, p in finals.items()} for k in range(len(plan))
            ]
            per_part_workers = max(1, args.workers // len(plan))
            ctx = multiprocessing.get_context()
            queue = ctx.Queue()
            procs = [
                ctx.Process(
                    target=_partition_process,
                    args=(k, units, part_prefixes[k], per_part_workers, init_args, args.strict, queue),
                )
                for k, units in enumerate(plan)
            ]
            for p in procs:
                p.start()
            remaining = len(procs)
            try:
                while remaining:
                    try:
                        msg = queue.get(timeout=1.0)
                    except queue_module.Empty:
                        dead = [k for k, p in enumerate(procs) if p.exitcode not in (None, 0)]
                        if dead:
                            raise RuntimeError(
                                f"partition {dead[0]} died (exit code {procs[dead[0]].exitcode})"
                            ) from None
                        continue
                    if msg[0] == "progress":
                        report(*msg[2:])
                    elif msg[0] == "done":
                        stats.merge(msg[2])
                        remaining -= 1
                    else:
                        raise StrictError(msg[2]) if args.strict else RuntimeError(msg[2])
            finally:
                for p in procs:
                    if p.is_alive() and remaining:
                        p.terminate()
                for p in procs:
                    p.join()
            for key in finals:
                merged = MMapIndexedDatasetBuilder(data_file_path(tmps[key]), dtype)
                try:
                    for parts in part_prefixes:
                        merged.add_index(parts[key])
                    merged.finalize(index_file_path(tmps[key]))
                except BaseException:
                    merged.abort()
                    raise
        for key in finals:
            commit_dataset(tmps[key], finals[key])
    finally:
        if progress is not None:
            progress.close()
        for prefix in tmps.values():
            remove_dataset(prefix)
        for parts in part_prefixes:
            for prefix in parts.values():
                remove_dataset(prefix)
    wall = time.perf_counter() - t0

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
        "workers": args.workers,
        "partitions": len(plan),
        "outputs": [finals[k] for k in args.json_keys],
        "dtype": dtype.name,
    }
    if args.workers <= 1 and len(plan) == 1:
        summary["outside_tokenization_fraction"] = max(0.0, 1.0 - stats.tokenize_seconds / wall)
    empty = sum(stats.empty.values())
    extra = ""
    if "outside_tokenization_fraction" in summary:
        extra = f", {100 * summary['outside_tokenization_fraction']:.1f}% of the time outside tokenization"
    print(
        f"done: {stats.docs} documents, {stats.tokens} tokens, {stats.input_bytes / 1e6:.2f} MB "
        f"in {wall:.2f}s "
        f"({summary['docs_per_s']:,.0f} docs/s, {summary['mb_per_s']:.2f} MB/s, "
        f"{summary['tokens_per_s']:,.0f} "
        f"tokens/s{extra}); skipped {stats.bad} bad lines, dropped {empty} empty documents; "
        f"wrote {', '.join(summary['outputs'])} ({dtype.name})",
        flush=True,
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tokenize JSONL into Megatron .bin/.idx datasets.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help=".jsonl / .jsonl.gz files or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one dataset each)")
    g.add_argument("--split-sentences", action="store_true", help="not supported (Megatron's BERT path)")
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="accepted for compatibility; documents are always tokenized whole, newlines kept",
    )
    g.add_argument("--strict", action="store_true", help="a bad input line is a fatal error")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    g.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model, HF directory or tokenizer.json"
    )
    g.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")
    g.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document id to every document"
    )
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1: in-process)")
    g.add_argument("--partitions", type=int, default=1, help="split the input into this many parallel parts")
    g.add_argument(
        "--log-interval", type=int, default=1000, help="refresh the docs/s, tok/s figures every N docs"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar (summary and warnings only)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.split_sentences:
        parser.error("--split-sentences is not supported: GPT pre-training tokenizes whole documents")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.partitions < 1:
        parser.error("--partitions must be >= 1")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        parser.error("--tokenizer-type NullTokenizer needs --vocab-size")
    try:
        run(args)
    except StrictError as exc:
        print(f"error: {exc} (--strict: stopping; nothing was written)", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: temporary outputs removed, nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
