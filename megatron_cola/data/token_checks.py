"""Bound checks on token ids, cheap enough to run on every sample or batch.

An id outside ``[0, tokenizer vocab)`` means the data was tokenized with another tokenizer: on CPU it ends
in an ``IndexError`` at some iteration, on GPU in a device-side assert, and an id inside the *padded*
vocabulary (``>= tokenizer vocab``) trains silently on an untrained row. ``GPTDataset`` turns all of them into
a :class:`DataError` that names the dataset, the document and the id (with ``FIX``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["first_bad_token"]

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
