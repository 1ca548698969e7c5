"""Input side of the preprocessing engine: which files, cut into which parts, read as chunks of lines.

``--input`` patterns are expanded by :func:`expand_inputs`; :func:`plan_partitions` cuts plain files at line
boundaries into byte ranges of about equal size (``.gz`` files are never cut); :func:`iter_chunks` reads a
partition as ``(path, [(line number, raw line), ...])`` chunks; :func:`parse_line` turns one raw line into
the texts of the requested JSON keys, or a reason why it is a bad line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_cola.errors import DataError

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_LINES",
    "WorkUnit",
    "expand_inputs",
    "iter_chunks",
    "parse_line",
    "plan_partitions",
]

CHUNK_LINES = 1024
CHUNK_BYTES = 1 << 18


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
                raise DataError(f"--input {pattern!r} matches no files")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"--input {pattern!r}: no such file")
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def is_gzip(path: str) -> bool:
    """Whether ``path`` is read through gzip (by its ``.gz`` suffix)."""
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
        if is_gzip(path) or not inside:
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


def _unit_chunks(unit: WorkUnit) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    opener = gzip.open if is_gzip(unit.path) else open
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


def iter_chunks(units: list[WorkUnit]) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """``(path, [(line number, raw line bytes), ...])`` chunks of at most CHUNK_LINES lines / ~CHUNK_BYTES.

    A truncated or corrupt ``.gz`` file raises :class:`DataError` naming it (the lines read before the
    damage have already been yielded; the caller discards the partial output).
    """
    for unit in units:
        try:
            yield from _unit_chunks(unit)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(
                f"{unit.path}: truncated or corrupt gzip file ({exc}); re-create or re-download it "
                "(`gzip -t FILE` checks a file)"
            ) from None


def parse_line(raw: bytes, keys: list[str]) -> tuple[list[str] | None, str | None]:
    """``(texts per key, None)`` for a good line, or ``(None, reason)`` for a bad one."""
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
