"""Bound checks on token ids, cheap enough to run on every sample or batch.

An id outside ``[0, tokenizer vocab)`` means the data was tokenized with another tokenizer: on CPU it ends
in an ``IndexError`` at some iteration, on GPU in a device-side assert, and an id inside the *padded*
vocabulary (``>= tokenizer vocab``) trains silently on an untrained row. These checks turn all of them into
a :class:`DataError` that names the dataset, the document and the id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_cola.errors import DataError

__all__ = ["check_token_ids", "first_bad_token"]

FIX = "preprocess the data with the tokenizer this run uses (tools/preprocess_data.py --tokenizer-model ...)"


def first_bad_token(tokens: np.ndarray, vocab_size: int) -> int | None:
    """Position of the first id outside ``[0, vocab_size)`` in a 1-D array, or None (one max, plus one min
    for signed dtypes, when everything is in range)."""
    if tokens.size == 0:
        return None
    bad = tokens.max() >= vocab_size
    if not bad and np.issubdtype(tokens.dtype, np.signedinteger):
        bad = tokens.min() < 0
    if not bad:
        return None
    return int(np.flatnonzero((tokens >= vocab_size) | (tokens < 0))[0])


def check_token_ids(tokens: Any, vocab_size: int, source: str = "batch") -> None:
    """Raise :class:`DataError` when a batch holds an id outside ``[0, vocab_size)``.

    ``tokens`` is a ``(micro_batch, seq + 1)`` integer array or CPU tensor (call it before moving the batch
    to the GPU: it reads one max and one min); ``vocab_size`` is the *tokenizer's* vocabulary size, not the
    padded embedding size. ``source`` names the data in the message (for example the ``--data-path``).
    """
    arr = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
    flat = arr.reshape(-1)
    pos = first_bad_token(flat, vocab_size)
    if pos is None:
        return
    row, col = divmod(pos, arr.shape[-1]) if arr.ndim > 1 else (0, pos)
    raise DataError(
        f"{source}: token id {int(flat[pos])} (micro-batch row {row}, position {col}) is outside the "
        f"tokenizer's vocabulary [0, {vocab_size}); {FIX}"
    )
