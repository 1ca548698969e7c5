"""The preprocessing engine behind ``tools/preprocess_data.py``: JSONL / Parquet / Arrow documents ->
Megatron ``.bin/.idx``.

:func:`preprocess` takes a :class:`PreprocessConfig` and writes ``{output_prefix}_{key}_document.bin/.idx``
for every key, byte-for-byte what Megatron-LM's ``preprocess_data.py`` writes for the same ids and flags:

* chunks of records (:mod:`megatron_cola.data.preprocess_input`: JSONL lines, or rows of Parquet / Arrow
  files) are parsed and tokenized in-process (``workers=1``) or by a process pool with bounded look-ahead,
  and come back in input order, so the worker count never changes the output;
* ``partitions > 1`` runs parts of the input in parallel processes and merges them with ``add_index`` in
  part order; as in Megatron-LM, record ``i`` belongs to part ``i % P`` (the output holds records 0, P,
  2P, ..., then 1, P+1, ...), or with ``keep_sequential_samples`` the parts are contiguous (input order);
* a document that tokenizes to nothing is recorded as Megatron records it: a document with no sequence
  (its boundary repeats in the document index) and no end-of-document token;
* each dataset gets its tokenizer record ``{name}.meta.json`` (:mod:`megatron_cola.data.sidecar`), written
  before the pair is published;
* outputs are written as ``{name}.tmp-{pid}.bin/.idx`` and renamed when complete (``.idx`` last); any
  exception, Ctrl-C or (inside :func:`sigterm_as_interrupt`) SIGTERM removes the temporaries.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queue_module
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_cola.data.indexed_dataset import (
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    commit_dataset,
    data_file_path,
    index_file_path,
    remove_dataset,
)
from megatron_cola.data.preprocess_input import (
    ColumnChunk,
    Deal,
    InputInfo,
    WorkUnit,
    expand_inputs,
    inspect_inputs,
    iter_chunks,
    json_keys_hint,
    parse_line,
    plan_partitions,
)
from megatron_cola.data.preprocess_report import BadLines, Progress, Stats, summarize
from megatron_cola.data.sidecar import dataset_record, tokenizer_record, write_sidecar
from megatron_cola.data.tokenizers import AbstractTokenizer, build_tokenizer
from megatron_cola.errors import DataError, MegatronColaError

__all__ = ["PreprocessConfig", "StrictError", "Terminated", "preprocess", "sigterm_as_interrupt"]


class StrictError(DataError):
    """A bad input line under ``strict``."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C (see :func:`sigterm_as_interrupt`) so the same cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread."""
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass(frozen=True)
class PreprocessConfig:
    """What to tokenize and where to write it (the flags of ``tools/preprocess_data.py``)."""

    #: ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` / ``.arrow`` files, globs, ``save_to_disk`` directories
    input: tuple[str, ...]
    output_prefix: str  #: writes ``{output_prefix}_{key}_document.bin/.idx``
    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_size: int | None = None  #: for ``NullTokenizer``
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False  #: end-of-document id after every non-empty document
    workers: int = 1  #: tokenizer processes; 1 runs in-process
    partitions: int = 1  #: parallel parts of the input, merged in order
    keep_sequential_samples: bool = False  #: contiguous partitions instead of Megatron's dealing
    strict: bool = False  #: the first bad line is fatal
    allow_empty: bool = False  #: write a dataset without tokens instead of raising DataError
    log_interval: int = 1000
    quiet: bool = False  #: no progress bar


# ---------------------------------------------------------------------------------------------- workers
@dataclass
class ChunkResult:
    """A tokenized chunk: per key the concatenated tokens and per-document lengths (0 = empty document)."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    docs: int = 0
    input_bytes: int = 0
    blank: int = 0
    empty: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, str, str]] = field(default_factory=list)  #: (where, reason, "line" or "row")
    tokenize_seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(int(t.size) for t in self.tokens.values())


_TOKENIZER: AbstractTokenizer | None = None
_CONFIG: dict = {}


def _init_worker(
    tokenizer_args: tuple[str, str | None, int | None], config: dict, pool: bool = False
) -> None:
    global _TOKENIZER, _CONFIG
    if pool:  # one process per core already: no extra threads inside Hugging Face tokenizers
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent cleans up; a pool worker just stops
    _TOKENIZER = build_tokenizer(*tokenizer_args)
    _CONFIG = config


def _tokenize_all(
    tok: AbstractTokenizer, texts: list[str], failed: dict[int, str]
) -> tuple[list[list[int] | None], float]:
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
    return ids, time.perf_counter() - t0


def _read_records(
    chunk: tuple[str, list[tuple[int, bytes]]] | ColumnChunk, keys: list[str], result: ChunkResult
) -> tuple[list[tuple[int, str]], list[list[str]], list[tuple[int, str, str]]]:
    """The good records of a chunk: ``(order, where)`` of each, their texts per key, and the bad ones as
    ``(order, where, reason)``."""
    good: list[tuple[int, str]] = []
    texts_per_key: list[list[str]] = [[] for _ in keys]
    bad: list[tuple[int, str, str]] = []
    if isinstance(chunk, ColumnChunk):
        result.input_bytes += chunk.nbytes
        for j, row in enumerate(chunk.rows):
            where = f"{chunk.path}: row {row} ({chunk.group_name} {chunk.group})"
            nulls = [key for k, key in enumerate(keys) if chunk.texts[k][j] is None]
            if nulls:
                bad.append((row, where, f"column {nulls[0]!r} is null, expected a string"))
                continue
            good.append((row, where))
            for k in range(len(keys)):
                texts_per_key[k].append(chunk.texts[k][j])
        return good, texts_per_key, bad
    path, lines = chunk
    for line_no, raw in lines:
        result.input_bytes += len(raw)
        if not raw.strip():
            result.blank += 1
            continue
        texts, reason = parse_line(raw, keys)
        if texts is None:
            bad.append((line_no, f"{path}:{line_no}", reason or "unreadable"))
            continue
        good.append((line_no, f"{path}:{line_no}"))
        for k, t in enumerate(texts):
            texts_per_key[k].append(t)
    return good, texts_per_key, bad


def process_chunk(chunk: tuple[str, list[tuple[int, bytes]]] | ColumnChunk) -> ChunkResult:
    """Parse and tokenize one chunk (runs in a worker, or in-process for ``workers=1``)."""
    tok = _TOKENIZER
    assert tok is not None, "worker not initialised"
    keys: list[str] = _CONFIG["keys"]
    eod = tok.eod if _CONFIG["append_eod"] else None

    result = ChunkResult(tokens={}, lengths={}, empty=dict.fromkeys(keys, 0))
    good, texts_per_key, bad = _read_records(chunk, keys, result)
    what = "row" if isinstance(chunk, ColumnChunk) else "line"

    failed: dict[int, str] = {}
    ids_per_key = []
    for texts in texts_per_key:
        ids, seconds = _tokenize_all(tok, texts, failed)
        result.tokenize_seconds += seconds
        ids_per_key.append(ids)
    for j in sorted(failed):
        bad.append((good[j][0], good[j][1], failed[j]))
    bad.sort(key=lambda b: b[0])
    result.bad = [(where, reason, what) for _, where, reason in bad]

    result.docs = len(good) - len(failed)
    for k, key in enumerate(keys):
        flat: list[int] = []
        lengths: list[int] = []
        for j, ids in enumerate(ids_per_key[k]):
            if j in failed or ids is None:
                continue
            if not ids:  # Megatron: a document without a sequence, no EOD
                result.empty[key] += 1
                lengths.append(0)
                continue
            flat.extend(ids)
            if eod is not None:
                flat.append(eod)
            lengths.append(len(ids) + (eod is not None))
        result.tokens[key] = np.array(flat, dtype=_CONFIG["dtype"])
        result.lengths[key] = np.array(lengths, dtype=np.int32)
    return result


def _ordered_results(chunks: Iterator[Any], workers: int, init_args: tuple) -> Iterator[ChunkResult]:
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
def run_partition(
    work: tuple[list[WorkUnit], Deal | None],
    infos: dict[str, InputInfo],
    out_prefixes: dict[str, str],
    workers: int,
    init_args: tuple,
    strict: bool,
    on_result: Callable[[ChunkResult], None],
) -> Stats:
    """Tokenize the records of ``work`` (units, deal) into one ``.bin/.idx`` pair per key at
    ``out_prefixes[key]``."""
    dtype = init_args[1]["dtype"]
    builders = {key: MMapIndexedDatasetBuilder(data_file_path(p), dtype) for key, p in out_prefixes.items()}
    stats = Stats()
    units, deal = work
    chunks = iter_chunks(units, init_args[1]["keys"], deal, infos)
    results = _ordered_results(chunks, workers, init_args)
    try:
        for result in results:
            if result.bad and strict:
                where, reason, _ = result.bad[0]
                raise StrictError(f"{where}: {reason}")
            for key, builder in builders.items():
                builder.add_documents(result.tokens[key], result.lengths[key], empty_as_no_sequence=True)
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


class _Stopped(Exception):
    """The parent asked a partition process to stop (another partition failed, or the run was interrupted)."""


def _partition_process(
    k: int,
    work: tuple[list[WorkUnit], Deal | None],
    infos: dict[str, InputInfo],
    out_prefixes: dict[str, str],
    workers: int,
    init_args: tuple,
    strict: bool,
    queue,
    stop,
) -> None:
    # SIGTERM kills a partition outright (its parent removes the files); a clean stop goes through `stop`,
    # checked after every chunk, so the worker pool is always shut down properly.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_result(r: ChunkResult) -> None:
        queue.put(("progress", k, r.docs, r.input_bytes, r.num_tokens, r.bad))
        if stop.is_set():
            raise _Stopped

    try:
        stats = run_partition(work, infos, out_prefixes, workers, init_args, strict, on_result)
    except (MegatronColaError, OSError) as exc:  # the user's input, files or disk
        text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
        queue.put(("fatal", k, text, type(exc) is StrictError, True))
        sys.exit(1)
    except BaseException as exc:  # noqa: BLE001 - report anything to the parent
        queue.put(("fatal", k, f"partition {k} failed: {type(exc).__name__}: {exc}", False, False))
        sys.exit(1)
    queue.put(("done", k, stats))


def _stop_partitions(procs: list, queue, stop, grace: float = 30.0) -> None:
    """Ask the partitions still running to stop and wait for them, draining the queue meanwhile (a child
    cannot exit before its queued messages are read); after ``grace`` seconds the stragglers are killed."""
    stop.set()
    deadline = time.monotonic() + grace
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        try:
            queue.get(timeout=0.1)
        except queue_module.Empty:
            pass
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join()


def _run_partitions(
    plan: list[tuple[list[WorkUnit], Deal | None]],
    infos: dict[str, InputInfo],
    part_prefixes: list[dict[str, str]],
    workers: int,
    init_args: tuple,
    strict: bool,
    report: Callable[..., None],
) -> Stats:
    """Run each partition in its own process; progress comes back through a queue."""
    stats = Stats()
    ctx = multiprocessing.get_context()
    queue, stop = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(
            target=_partition_process,
            args=(k, work, infos, part_prefixes[k], workers, init_args, strict, queue, stop),
        )
        for k, work in enumerate(plan)
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
                _, _, text, is_strict, user_error = msg
                if is_strict:
                    raise StrictError(text)
                raise DataError(text) if user_error else RuntimeError(text)
    finally:
        if remaining:
            _stop_partitions(procs, queue, stop)
        for p in procs:
            p.join()
    return stats


def _merge_parts(part_prefixes: list[dict[str, str]], tmps: dict[str, str], dtype: np.dtype) -> None:
    for key, tmp in tmps.items():
        merged = MMapIndexedDatasetBuilder(data_file_path(tmp), dtype)
        try:
            for parts in part_prefixes:
                merged.add_index(parts[key])
            merged.finalize(index_file_path(tmp))
        except BaseException:
            merged.abort()
            raise


def _check_not_empty(config: PreprocessConfig, stats: Stats, files: list[str]) -> None:
    if config.allow_empty:
        return
    inputs = " ".join(config.input)
    if stats.docs == 0:
        hint = json_keys_hint(files, config.json_keys) if stats.bad else None
        raise DataError(
            f"--input {inputs}: no documents ({stats.blank} blank lines, {stats.bad} bad lines"
            + (f"; {hint}" if hint else "")
            + "); nothing was written (pass --allow-empty to write an empty dataset anyway)"
        )
    for key in config.json_keys:
        if stats.tokens_per_key.get(key, 0) == 0:
            raise DataError(
                f"--input {inputs}: all {stats.docs} documents of key {key!r} are empty; nothing was written "
                "(pass --allow-empty to write a dataset without tokens anyway)"
            )


def _recorded_flags(config: PreprocessConfig, key: str) -> dict:
    """The preprocessing flags kept in a dataset's ``.meta.json`` record."""
    return {
        "tool": "tools/preprocess_data.py",
        "input": list(config.input),
        "json_key": key,
        "json_keys": list(config.json_keys),
        "append_eod": config.append_eod,
        "workers": config.workers,
        "partitions": config.partitions,
        "keep_sequential_samples": config.keep_sequential_samples,
        "strict": config.strict,
        "allow_empty": config.allow_empty,
    }


def output_prefixes(output_prefix: str, keys: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``{key: f"{output_prefix}_{key}_document"}``."""
    return {key: f"{output_prefix}_{key}_document" for key in keys}


def preprocess(config: PreprocessConfig) -> dict:
    """Tokenize ``config.input`` into one dataset per JSON key; returns the summary (also printed).

    Raises :class:`DataError` (bad or unreadable input, outputs that cannot be written, an empty result,
    :class:`StrictError` under ``strict``) or ``KeyboardInterrupt``; in every case the temporary outputs are
    removed and nothing is published.
    """
    try:
        return _preprocess(config)
    except OSError as exc:  # unreadable input, unwritable output, disk full: name the file
        where = exc.filename or config.output_prefix
        raise DataError(f"{where}: {exc.strerror or exc}; nothing was written") from exc


def _preprocess(config: PreprocessConfig) -> dict:
    files = expand_inputs(list(config.input))
    infos = {i.path: i for i in inspect_inputs(files, config.json_keys)}
    tokenizer_args = (config.tokenizer_type, config.tokenizer_model, config.vocab_size)
    tokenizer = build_tokenizer(*tokenizer_args)
    dtype = np.dtype(best_fitting_dtype(tokenizer.vocab_size))
    init_args = (
        tokenizer_args,
        {"keys": list(config.json_keys), "dtype": dtype, "append_eod": config.append_eod},
    )
    finals = output_prefixes(config.output_prefix, config.json_keys)
    os.makedirs(os.path.dirname(os.path.abspath(config.output_prefix)), exist_ok=True)
    pid = os.getpid()
    tmps = {key: f"{p}.tmp-{pid}" for key, p in finals.items()}

    plan = plan_partitions(list(infos.values()), config.partitions, config.keep_sequential_samples)
    progress = None if config.quiet else Progress(sum(os.path.getsize(f) for f in files), config.log_interval)

    quiet_bad = BadLines(lambda line: print(line, file=sys.stderr))

    def report(docs: int, nbytes: int, tokens: int, bad: list[tuple[str, str, str]]) -> None:
        if progress is not None:
            progress.update(docs, nbytes, tokens, bad)
        else:
            quiet_bad.report(bad)

    t0 = time.perf_counter()
    part_prefixes: list[dict[str, str]] = []
    try:
        if len(plan) == 1:
            on_result = lambda r: report(r.docs, r.input_bytes, r.num_tokens, r.bad)  # noqa: E731
            stats = run_partition(plan[0], infos, tmps, config.workers, init_args, config.strict, on_result)
        else:
            part_prefixes = [
                {key: f"{p}.part{k}.tmp-{pid}" for key, p in finals.items()} for k in range(len(plan))
            ]
            workers = max(1, config.workers // len(plan))
            stats = _run_partitions(plan, infos, part_prefixes, workers, init_args, config.strict, report)
            _merge_parts(part_prefixes, tmps, dtype)
        _check_not_empty(config, stats, files)
        tok_record = tokenizer_record(*tokenizer_args[:2], tokenizer.vocab_size, tokenizer.eod)
        for key in finals:  # the record first: a published .idx always has its own
            flags = _recorded_flags(config, key)
            write_sidecar(finals[key], dataset_record(tmps[key], tok_record, dtype.name, flags))
            commit_dataset(tmps[key], finals[key])
    finally:
        if progress is not None:
            progress.close()
        for prefix in [*tmps.values(), *(p for parts in part_prefixes for p in parts.values())]:
            remove_dataset(prefix)
    wall = time.perf_counter() - t0
    outputs = [finals[k] for k in config.json_keys]
    return summarize(stats, wall, config.workers, len(plan), outputs, dtype)
