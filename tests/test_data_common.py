"""Shared helpers for the tests/test_data_*.py files (synthetic corpora, a tiny SentencePiece model, an
independent struct-based MMIDIDX writer/parser written from the format spec in docs/data.md, running the
tools)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"

# Spec constants, restated here on purpose (not imported from the code under test).
SPEC_MAGIC = b"MMIDIDX\x00\x00"
SPEC_CODES = {
    "uint8": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "float64": 6,
    "float32": 7,
    "uint16": 8,
}
SPEC_STRUCT = {"uint8": "B", "int8": "b", "int16": "h", "int32": "i", "int64": "q", "uint16": "H"}

WORDS = (
    "the of and to a in that is was he for it with as his on be at by I this had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do first "
    "crème brûlée naïve façade 東京 北京 Привет мир ελληνικά 🙂 42 1999 3.14 -- ; : ! ?"
).split()


def tool_env() -> dict[str, str]:
    """The environment of a tool subprocess: this checkout's package first, one thread."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def run_tool(name: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python tools/{name}.py args...`` in a subprocess (text output captured)."""
    proc = subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=tool_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_docs(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    """Random multi-line documents with punctuation, digits and non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words // 3 + 1))))
        sep = rng.choice(["\n", "\n\n", "\n  "])
        docs.append(sep.join(lines))
    return docs


def write_jsonl(path: Path | str, docs: list[str], key: str = "text") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": {"n": len(d)}}, ensure_ascii=False) + "\n")
    return path


def train_tiny_spm(directory: Path | str, vocab_size: int = 400, seed: int = 1) -> str:
    """A small byte-fallback BPE SentencePiece model, trained in-process by the train_tokenizer engine."""
    directory = Path(directory)
    corpus = write_jsonl(directory / "spm_corpus.jsonl", make_docs(300, seed=seed))
    from megatron_cola.data.tokenizer_training import train_tokenizer

    return train_tokenizer([str(corpus)], str(directory / "tiny"), vocab_size, num_threads=1)


def spec_write_dataset(prefix: str, seqs: list[list[int]], doc_starts: list[int], dtype: str) -> None:
    """Independent MMIDIDX v1 writer (struct only) following docs/data.md."""
    fmt = SPEC_STRUCT[dtype]
    itemsize = struct.calcsize("<" + fmt)
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(struct.pack(f"<{len(s)}{fmt}", *s))
    pointers, pos = [], 0
    for s in seqs:
        pointers.append(pos)
        pos += len(s) * itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(SPEC_MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", SPEC_CODES[dtype]))
        f.write(struct.pack("<Q", len(seqs)))
        f.write(struct.pack("<Q", len(doc_starts)))
        f.write(struct.pack(f"<{len(seqs)}i", *[len(s) for s in seqs]))
        f.write(struct.pack(f"<{len(seqs)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_starts)}q", *doc_starts))


def spec_expected_idx_bytes(lengths: list[int], doc_starts: list[int], dtype: str) -> bytes:
    """The exact ``.idx`` bytes the spec (and Megatron's builder) gives for these lengths."""
    itemsize = struct.calcsize("<" + SPEC_STRUCT[dtype])
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * itemsize
    return b"".join(
        [
            SPEC_MAGIC,
            struct.pack("<Q", 1),
            struct.pack("<B", SPEC_CODES[dtype]),
            struct.pack("<QQ", len(lengths), len(doc_starts)),
            struct.pack(f"<{len(lengths)}i", *lengths),
            struct.pack(f"<{len(lengths)}q", *pointers),
            struct.pack(f"<{len(doc_starts)}q", *doc_starts),
        ]
    )


def spec_read_dataset(prefix: str) -> tuple[str, list[list[int]], list[int]]:
    """Independent struct parser: (dtype name, sequences, document start indices)."""
    with open(prefix + ".idx", "rb") as f:
        data = f.read()
    assert data[:9] == SPEC_MAGIC
    (version,) = struct.unpack_from("<Q", data, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", data, 17)
    dtype = {v: k for k, v in SPEC_CODES.items()}[code]
    n, d = struct.unpack_from("<QQ", data, 18)
    off = 34
    lengths = list(struct.unpack_from(f"<{n}i", data, off))
    off += 4 * n
    pointers = list(struct.unpack_from(f"<{n}q", data, off))
    off += 8 * n
    doc_starts = list(struct.unpack_from(f"<{d}q", data, off))
    off += 8 * d
    assert off == len(data), "trailing bytes in .idx"
    fmt = SPEC_STRUCT[dtype]
    with open(prefix + ".bin", "rb") as f:
        blob = f.read()
    seqs = [list(struct.unpack_from(f"<{ln}{fmt}", blob, p)) for ln, p in zip(lengths, pointers)]
    itemsize = struct.calcsize("<" + fmt)
    assert sum(lengths) * itemsize == len(blob)
    return dtype, seqs, doc_starts
