"""The tokenizer record written next to every dataset: ``{prefix}.meta.json`` beside ``{prefix}.bin/.idx``.

Data tokenized with an 8k vocabulary trains silently with a 32k tokenizer (every id is in range), so
``tools/preprocess_data.py`` and ``tools/merge_datasets.py`` record which tokenizer made a dataset: its
type, a SHA-256 of its model file(s), its vocabulary size and end-of-document id, the preprocessing flags,
and the SHA-1 and size of the ``.idx``/``.bin`` it describes. The ``.idx`` stays Megatron's format; Megatron
writes no ``*.meta.json`` file, so the name never collides with its outputs.

At start-up :func:`check_data_tokenizers` compares each ``--data-path`` prefix's record with the run's
tokenizer and raises :class:`DataError` naming both when they differ. A dataset without a record (made by
Megatron-LM, or before records existed), or whose record describes other ``.idx`` bytes (the dataset was
rewritten by another tool), cannot be checked: it loads, with a one-line note.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from megatron_cola.atomic_io import atomic_write_text
from megatron_cola.data.indexed_dataset import data_file_path, index_file_path
from megatron_cola.data.tokenizers import TOKENIZER_TYPES
from megatron_cola.errors import DataError

__all__ = [
    "SIDECAR_FORMAT",
    "SIDECAR_SUFFIX",
    "TokenizerRecord",
    "check_data_tokenizers",
    "dataset_record",
    "describes",
    "read_sidecar",
    "recorded_tokenizer",
    "sidecar_path",
    "tokenizer_model_digest",
    "tokenizer_record",
    "write_sidecar",
]

SIDECAR_SUFFIX = ".meta.json"
SIDECAR_FORMAT = "megatron-cola dataset record"
SIDECAR_VERSION = 1

#: The files of a Hugging Face tokenizer directory that define it (weights in the same folder are not read).
HF_TOKENIZER_FILES = (
    "added_tokens.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "special_tokens_map.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
)


def sidecar_path(prefix: str) -> str:
    """``{prefix}.meta.json``."""
    return prefix + SIDECAR_SUFFIX


def _sha256_file(path: str, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def tokenizer_model_digest(model: str | None) -> str | None:
    """SHA-256 of a tokenizer model file, or of a Hugging Face directory's tokenizer files (name and bytes
    of each, sorted); ``None`` without a model (``NullTokenizer``)."""
    if not model:
        return None
    if os.path.isdir(model):
        h = hashlib.sha256()
        for name in HF_TOKENIZER_FILES:
            path = os.path.join(model, name)
            if os.path.isfile(path):
                h.update(name.encode() + b"\0")
                _sha256_file(path, h)
        return h.hexdigest()
    return _sha256_file(model).hexdigest()


@dataclass(frozen=True)
class TokenizerRecord:
    """What identifies a tokenizer: its class (``GPTSentencePieceTokenizer`` is ``SentencePieceTokenizer``),
    the model path as given (for messages only), the model's SHA-256, vocabulary size and EOD id."""

    type: str
    model: str | None
    model_sha256: str | None
    vocab_size: int
    eod: int

    def describe(self) -> str:
        model = f" {self.model}" if self.model else ""
        digest = f"sha256 {self.model_sha256[:12]}, " if self.model_sha256 else ""
        return f"{self.type}{model} ({digest}vocab size {self.vocab_size}, eod {self.eod})"

    def differences(self, other: TokenizerRecord) -> list[str]:
        fields = ("type", "model_sha256", "vocab_size", "eod")
        return [f for f in fields if getattr(self, f) != getattr(other, f)]


def tokenizer_record(
    tokenizer_type: str, tokenizer_model: str | None, vocab_size: int, eod: int
) -> TokenizerRecord:
    """The record of a tokenizer built from ``--tokenizer-type/--tokenizer-model`` (``vocab_size`` and
    ``eod`` as the built tokenizer reports them)."""
    cls = TOKENIZER_TYPES.get(tokenizer_type)
    name = cls.__name__ if cls is not None else tokenizer_type
    model = None if name == "NullTokenizer" else tokenizer_model
    return TokenizerRecord(name, model, tokenizer_model_digest(model), int(vocab_size), int(eod))


def _files_record(prefix: str) -> dict[str, Any]:
    return {
        "idx_sha1": _sha1(index_file_path(prefix)),
        "bin_bytes": os.path.getsize(data_file_path(prefix)),
    }


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def dataset_record(
    data_prefix: str, tokenizer: TokenizerRecord, dtype: str, preprocess: dict[str, Any]
) -> dict[str, Any]:
    """The sidecar content for the finished pair at ``data_prefix`` (which may be a temporary name)."""
    return {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "tokenizer": asdict(tokenizer),
        "dtype": dtype,
        "preprocess": preprocess,
        "files": _files_record(data_prefix),
    }


def write_sidecar(prefix: str, record: dict[str, Any]) -> str:
    """Write ``record`` to ``{prefix}.meta.json`` atomically; returns the path."""
    path = sidecar_path(prefix)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(prefix: str) -> dict[str, Any] | None:
    """The record of ``prefix``, ``None`` when it has none; an unreadable one is a :class:`DataError`."""
    path = sidecar_path(prefix)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: unreadable dataset record ({exc}); delete it or re-run preprocessing"
        ) from None
    if not isinstance(record, dict) or record.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{path}: not a Megatron-CoLA dataset record; delete it or re-run preprocessing")
    return record


def recorded_tokenizer(prefix: str, record: dict[str, Any]) -> TokenizerRecord:
    """The :class:`TokenizerRecord` stored in ``record``."""
    try:
        return TokenizerRecord(**record["tokenizer"])
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"{sidecar_path(prefix)}: malformed tokenizer entry ({exc}); delete it or re-run preprocessing"
        ) from None


def describes(prefix: str, record: dict[str, Any]) -> bool:
    """Whether ``record`` was written for the ``.bin/.idx`` now at ``prefix`` (SHA-1 of the ``.idx``, size
    of the ``.bin``)."""
    return record.get("files") == _files_record(prefix)


def check_data_tokenizers(prefixes: Sequence[str], run: TokenizerRecord, what: str = "this run") -> list[str]:
    """Compare every prefix's record with the run's tokenizer; :class:`DataError` on the first mismatch.

    Returns the notes to print (one line each) for datasets that cannot be checked; prefixes without an
    ``.idx`` are left to the dataset builder to report."""
    notes, unrecorded = [], []
    for prefix in prefixes:
        if not os.path.isfile(index_file_path(prefix)):
            continue
        record = read_sidecar(prefix)
        if record is None:
            unrecorded.append(prefix)
            continue
        if not describes(prefix, record):
            notes.append(
                f"note: {sidecar_path(prefix)} describes other .bin/.idx contents (the dataset was rewritten "
                "by another tool), so its tokenizer is not checked; delete the stale file"
            )
            continue
        data = recorded_tokenizer(prefix, record)
        diff = data.differences(run)
        if diff:
            raise DataError(
                f"{prefix} was tokenized with {data.describe()} (recorded in {sidecar_path(prefix)}), "
                f"but {what} uses {run.describe()}; they differ in {', '.join(diff)}. Train with the "
                "tokenizer the data was made with (--tokenizer-type / --tokenizer-model), or re-run "
                "tools/preprocess_data.py with this run's tokenizer"
            )
    if unrecorded:
        notes.append(
            f"note: no tokenizer record ({SIDECAR_SUFFIX}) for {', '.join(unrecorded)} (preprocessed "
            "elsewhere, e.g. by Megatron-LM): cannot check that this run's tokenizer made it"
        )
    return notes
