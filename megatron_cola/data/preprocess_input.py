"""Input side of the preprocessing engine: which files, cut into which parts, read as chunks of records.

Three kinds of input, told apart by name: JSONL (``.jsonl``, ``.json``, any other name; ``.gz`` read through
gzip), Parquet (``.parquet``) and Arrow IPC files (``.arrow``, as Hugging Face ``datasets`` writes them). A
``datasets`` ``save_to_disk`` directory (``state.json`` + ``data-*.arrow``) stands for its Arrow files in
``state.json`` order. Columnar files are read with pyarrow one row group (Parquet) or record batch (Arrow)
at a time, only the ``--json-keys`` columns, never the whole file.

* :func:`expand_inputs` expands ``--input`` patterns (globs, directories);
* :func:`inspect_inputs` opens every columnar file once: its schema must hold each key as a string column
  (else :class:`DataError` listing the columns), and its row count is read for planning and progress;
* :func:`plan_partitions` gives the work of each partition: Megatron-LM's default deals records out in turn
  (record ``i`` to partition ``i % P``: every partition reads all the input and keeps its own records); with
  ``sequential`` the input is cut into ``P`` contiguous ranges of about equal bytes (JSONL at line
  boundaries, ``.gz`` files never cut, columnar files at rows);
* :func:`iter_chunks` reads a partition as chunks: ``(path, [(line number, raw line), ...])`` for JSONL, a
  :class:`ColumnChunk` for columnar files; :func:`parse_line` turns a raw JSONL line into the texts of the
  keys, or a reason why it is a bad line; :func:`json_keys_hint` says which ``--json-keys`` the JSONL
  lines hold when none had the keys asked for.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_cola.errors import DataError

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_LINES",
    "ColumnChunk",
    "Deal",
    "InputInfo",
    "WorkUnit",
    "expand_inputs",
    "input_kind",
    "inspect_inputs",
    "iter_chunks",
    "json_keys_hint",
    "parse_line",
    "plan_partitions",
]

CHUNK_LINES = 1024
CHUNK_BYTES = 1 << 18


@dataclass
class WorkUnit:
    """Records of ``path`` in ``[start, end)`` (``end=None``: to the end), the first being line
    ``first_line``. JSONL: byte offsets (cut at line starts); columnar files: row numbers."""

    path: str
    start: int = 0
    end: int | None = None
    first_line: int = 1


@dataclass(frozen=True)
class Deal:
    """Megatron-LM's partition order: the ``i``-th record of the input (counted over all files, blank and
    bad lines included) belongs to partition ``i % stride``; this partition keeps those with ``offset``."""

    stride: int
    offset: int


@dataclass
class ColumnChunk:
    """Rows of a columnar file: ``texts[k][j]`` is key ``k`` of row ``rows[j]`` (``None``: a null value).

    ``group`` is the row group (Parquet) or record batch (Arrow) the rows come from, ``nbytes`` the share
    of the file's bytes charged to them (for the progress bar)."""

    path: str
    group: int
    rows: list[int]
    texts: list[list[Any]]
    nbytes: int = 0
    group_name: str = "row group"  #: "record batch" for Arrow files


@dataclass
class InputInfo:
    """One ``--input`` file: its kind and, for a columnar file, its row count and row-group sizes."""

    path: str
    kind: str  #: "jsonl", "parquet" or "arrow"
    size: int
    num_rows: int = 0
    group_rows: list[int] = field(default_factory=list)


def input_kind(path: str) -> str:
    """``"parquet"``, ``"arrow"`` or ``"jsonl"`` by the file name."""
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "jsonl"


def _saved_dataset_files(directory: str) -> list[str]:
    """The Arrow files of a ``datasets`` ``save_to_disk`` directory, in ``state.json`` order."""
    state = os.path.join(directory, "state.json")
    if not os.path.isfile(state):
        if os.path.isfile(os.path.join(directory, "dataset_dict.json")):
            splits = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
            raise DataError(
                f"--input {directory!r} is a saved DatasetDict; name one split's directory, e.g. "
                f"--input {os.path.join(directory, splits[0] if splits else 'train')}"
            )
        raise DataError(
            f"--input {directory!r} is a directory without state.json (not a `datasets` save_to_disk "
            "directory); pass its files or a glob such as DIR/*.parquet"
        )
    try:
        with open(state, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state}: not a readable `datasets` state.json ({exc})") from None
    files = [os.path.join(directory, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{state} lists {missing[0]}, which does not exist; re-save the dataset")
    return files


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by ``--input`` (globs expanded and sorted, ``save_to_disk`` directories expanded,
    duplicates dropped, order kept)."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"--input {pattern!r} matches no files")
            files.extend(matches)
        elif os.path.isdir(pattern):
            files.extend(_saved_dataset_files(pattern))
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"--input {pattern!r}: no such file")
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def is_gzip(path: str) -> bool:
    """Whether ``path`` is read through gzip (by its ``.gz`` suffix)."""
    return path.endswith(".gz")


# ---------------------------------------------------------------------------------------------- columnar
def _damaged(path: str, where: str, exc: BaseException) -> DataError:
    return DataError(
        f"{path}: {where}cannot be read, the file is truncated or corrupt ({exc}); re-create or "
        "re-download it"
    )


def _open_parquet(path: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, "", exc) from None


def _arrow_batches(path: str) -> Iterator[Any]:
    """Record batches of an Arrow IPC stream (``datasets``' format) or file, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        head = source.read(6)
        source.seek(0)
        reader = pa.ipc.open_file(source) if head == b"ARROW1" else pa.ipc.open_stream(source)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            yield from reader
    finally:
        source.close()


def _arrow_schema(path: str) -> Any:
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        head = source.read(6)
        source.seek(0)
        reader = pa.ipc.open_file(source) if head == b"ARROW1" else pa.ipc.open_stream(source)
        return reader.schema
    finally:
        source.close()


def _is_text(arrow_type: Any) -> bool:
    import pyarrow as pa

    t = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    return (
        pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)
    )


def _check_schema(path: str, schema: Any, keys: Sequence[str]) -> None:
    names = list(schema.names)
    for key in keys:
        if key not in names:
            shown = ", ".join(f"{n} ({schema.field(n).type})" for n in names[:20])
            raise DataError(
                f"{path}: no column {key!r} (columns: {shown or 'none'}); pass --json-keys with the column "
                "that holds the text"
            )
        if not _is_text(schema.field(key).type):
            raise DataError(
                f"{path}: column {key!r} holds {schema.field(key).type} values (every row group), expected "
                "strings; pass --json-keys with the column that holds the text"
            )


def inspect_inputs(files: Sequence[str], keys: Sequence[str]) -> list[InputInfo]:
    """Kind, size and (columnar files) row counts of the inputs; a columnar file without every key as a
    string column, or one that cannot be read, is a :class:`DataError` naming it."""
    import pyarrow as pa

    out = []
    for path in files:
        info = InputInfo(path, input_kind(path), os.path.getsize(path))
        if info.kind == "parquet":
            pf = _open_parquet(path)
            _check_schema(path, pf.schema_arrow, keys)
            info.group_rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        elif info.kind == "arrow":
            try:
                _check_schema(path, _arrow_schema(path), keys)
                for batch in _arrow_batches(path):  # headers only: the file is memory-mapped
                    info.group_rows.append(batch.num_rows)
            except (pa.ArrowException, OSError) as exc:
                raise _damaged(path, f"record batch {len(info.group_rows)}: ", exc) from None
        info.num_rows = sum(info.group_rows)
        out.append(info)
    return out


def _parquet_batches(
    pf: Any, info: InputInfo, keys: Sequence[str], start: int, end: int
) -> Iterator[tuple[int, int, list[list[Any]]]]:
    import pyarrow as pa

    group_start = 0
    for g, n in enumerate(info.group_rows):
        lo, hi = max(start, group_start), min(end, group_start + n)
        if lo < hi:
            try:
                row = group_start
                for batch in pf.iter_batches(
                    batch_size=CHUNK_LINES, row_groups=[g], columns=list(keys), use_threads=False
                ):
                    a, b = max(lo, row), min(hi, row + batch.num_rows)
                    if a < b:
                        part = batch.slice(a - row, b - a)
                        yield g, a, [part.column(k).to_pylist() for k in keys]
                    row += batch.num_rows
            except (pa.ArrowException, OSError) as exc:
                raise _damaged(info.path, f"row group {g}: ", exc) from None
        group_start += n
        if group_start >= end:
            return


def _column_batches(
    info: InputInfo, keys: Sequence[str], start: int, end: int
) -> Iterator[tuple[int, int, list[list[Any]]]]:
    """``(group, first row, texts per key)`` for the rows ``[start, end)`` of a columnar file, one
    row group / record batch (in slices of at most CHUNK_LINES rows) at a time."""
    import pyarrow as pa

    if info.kind == "parquet":
        pf = _open_parquet(info.path)
        try:
            yield from _parquet_batches(pf, info, keys, start, end)
        finally:
            pf.close()
        return
    group_start = g = 0
    try:
        for g, batch in enumerate(_arrow_batches(info.path)):
            n = batch.num_rows
            lo, hi = max(start, group_start), min(end, group_start + n)
            for a in range(lo, hi, CHUNK_LINES):
                b = min(hi, a + CHUNK_LINES)
                part = batch.slice(a - group_start, b - a)
                yield g, a, [part.column(k).to_pylist() for k in keys]
            group_start += n
            if group_start >= end:
                return
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(info.path, f"record batch {g}: ", exc) from None


def _column_chunks(
    info: InputInfo, unit: WorkUnit, keys: Sequence[str], deal: Deal | None, counter: list[int]
) -> Iterator[ColumnChunk]:
    end = info.num_rows if unit.end is None else unit.end
    total = max(info.num_rows, 1)

    def charge(row: int) -> int:  # the file's bytes spread over its rows, exactly (sums to the file size)
        return info.size * (row + 1) // total - info.size * row // total

    for group, first, texts in _column_batches(info, keys, unit.start, end):
        n = len(texts[0]) if texts else 0
        base = counter[0]
        counter[0] += n
        if deal is None:
            picks = range(n)
        else:  # records base + j with (base + j) % stride == offset
            picks = range((deal.offset - base) % deal.stride, n, deal.stride)
        if not picks:
            continue
        # cut into chunks of at most ~CHUNK_BYTES of text
        size, chunk_rows = 0, []
        for j in picks:
            chunk_rows.append(j)
            size += sum(len(col[j] or "") for col in texts)
            if size >= CHUNK_BYTES:
                yield _make_chunk(info, group, first, texts, chunk_rows, charge)
                size, chunk_rows = 0, []
        if chunk_rows:
            yield _make_chunk(info, group, first, texts, chunk_rows, charge)


def _make_chunk(
    info: InputInfo, group: int, first: int, texts: list[list[Any]], picks: list[int], charge: Any
) -> ColumnChunk:
    if len(picks) == len(texts[0]):
        sel = texts
    else:
        sel = [[col[j] for j in picks] for col in texts]
    rows = [first + j for j in picks]
    name = "row group" if info.kind == "parquet" else "record batch"
    return ColumnChunk(info.path, group, rows, sel, sum(charge(r) for r in rows), name)


# ---------------------------------------------------------------------------------------------- planning
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


def plan_partitions(
    infos: list[InputInfo], partitions: int, sequential: bool = False
) -> list[tuple[list[WorkUnit], Deal | None]]:
    """The work of each partition: its units and, in Megatron's default order, its :class:`Deal`.

    Default (Megatron-LM): every partition gets every file and keeps record ``i`` when ``i % P == k``, so
    the merged output holds records 0, P, 2P, ... then 1, P+1, ... With ``sequential``
    (``--keep-sequential-samples``) the input is cut into ``P`` contiguous groups of about equal bytes
    (empty groups dropped), so the merged output is in input order.
    """
    if partitions <= 1:
        return [([WorkUnit(i.path) for i in infos], None)]
    if not sequential:
        return [([WorkUnit(i.path) for i in infos], Deal(partitions, k)) for k in range(partitions)]
    total = max(sum(i.size for i in infos), 1)
    targets = [total * k // partitions for k in range(1, partitions)]
    groups: list[list[WorkUnit]] = [[] for _ in range(partitions)]
    cum = 0
    for info in infos:
        path, size = info.path, info.size
        inside = [t - cum for t in targets if cum < t < cum + size]
        if not inside or is_gzip(path) or (info.kind != "jsonl" and info.num_rows < 2):
            part = sum(1 for t in targets if t <= cum + size // 2)
            groups[part].append(WorkUnit(path))
        elif info.kind == "jsonl":
            cuts = [(0, 1), *_cut_points(path, inside), (size, -1)]
            for (start, line), (end, _) in zip(cuts[:-1], cuts[1:]):
                if end > start:
                    part = sum(1 for t in targets if t <= cum + start)
                    groups[part].append(WorkUnit(path, start, end, line))
        else:  # rows in proportion to bytes
            rows = [0, *(info.num_rows * off // size for off in inside), info.num_rows]
            for k, (start, end) in enumerate(zip(rows[:-1], rows[1:])):
                if end > start:
                    at = 0 if k == 0 else inside[k - 1]
                    part = sum(1 for t in targets if t <= cum + at)
                    groups[part].append(WorkUnit(path, start, end))
        cum += size
    return [(g, None) for g in groups if g]


# ---------------------------------------------------------------------------------------------- reading
def _unit_lines(unit: WorkUnit) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if is_gzip(unit.path) else open
    with opener(unit.path, "rb") as f:
        if unit.start:
            f.seek(unit.start)
        pos = unit.start
        line_no = unit.first_line
        for raw in f:
            if unit.end is not None and pos >= unit.end:
                break
            pos += len(raw)
            yield line_no, raw
            line_no += 1


def _line_chunks(
    unit: WorkUnit, deal: Deal | None, counter: list[int]
) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for line_no, raw in _unit_lines(unit):
        if deal is not None:
            mine = counter[0] % deal.stride == deal.offset
            counter[0] += 1
            if not mine:
                continue
        chunk.append((line_no, raw))
        size += len(raw)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield unit.path, chunk
            chunk, size = [], 0
    if chunk:
        yield unit.path, chunk


def iter_chunks(
    units: list[WorkUnit],
    keys: Sequence[str] = ("text",),
    deal: Deal | None = None,
    infos: dict[str, InputInfo] | None = None,
) -> Iterator[tuple[str, list[tuple[int, bytes]]] | ColumnChunk]:
    """Chunks of at most CHUNK_LINES records / ~CHUNK_BYTES: ``(path, [(line number, raw line), ...])`` for
    JSONL, :class:`ColumnChunk` for columnar files (``infos`` from :func:`inspect_inputs`). With ``deal``
    only this partition's records are read out (the count runs over all ``units`` in order).

    A truncated or corrupt file raises :class:`DataError` naming it (and the row group); the records read
    before the damage have already been yielded, the caller discards the partial output.
    """
    counter = [0]
    for unit in units:
        info = (infos or {}).get(unit.path)
        if info is not None and info.kind != "jsonl":
            yield from _column_chunks(info, unit, keys, deal, counter)
            continue
        try:
            yield from _line_chunks(unit, deal, counter)
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


def json_keys_hint(files: Sequence[str], keys: Sequence[str], max_lines: int = 200) -> str | None:
    """When the JSONL lines of ``files`` lack a key of ``keys``: which keys they hold and the
    ``--json-keys`` to pass (the string-valued key with the most text over the first ``max_lines``
    objects of each file), e.g. ``"no line has key 'text'; the lines hold keys content, id, url: pass
    --json-keys content"``. ``None`` when the keys are there (the lines are bad for another reason)."""
    seen: dict[str, int] = {}  # key -> objects holding it
    text_chars: dict[str, int] = {}  # key -> characters of its string values
    for path in files:
        if input_kind(path) != "jsonl":
            continue
        opener = gzip.open if is_gzip(path) else open
        try:
            with opener(path, "rb") as f:
                for i, raw in enumerate(f):
                    if i >= max_lines:
                        break
                    try:
                        obj = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue
                    if not isinstance(obj, dict):
                        continue
                    for k, v in obj.items():
                        seen[k] = seen.get(k, 0) + 1
                        if isinstance(v, str):
                            text_chars[k] = text_chars.get(k, 0) + len(v)
        except (OSError, EOFError, zlib.error):
            continue
    missing = [k for k in keys if k not in seen]
    if not seen or not missing:
        return None
    listed = ", ".join(sorted(seen)[:20]) + (", ..." if len(seen) > 20 else "")
    what = f"no line has key {missing[0]!r}" if len(missing) == 1 else f"no line has keys {missing}"
    texts = sorted((k for k in text_chars if k not in keys), key=lambda k: -text_chars[k])
    if not texts:
        return f"{what}; the lines hold keys {listed}, none of them a string: pass --json-keys KEY"
    return f"{what}; the lines hold keys {listed}: pass --json-keys {texts[0]}"
