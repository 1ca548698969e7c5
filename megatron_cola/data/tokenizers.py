"""Tokenizers behind one small interface: ``tokenize``, ``detokenize``, ``vocab_size``, ``eod``.

* :class:`SentencePieceTokenizer`: a SentencePiece ``.model`` file (e.g. trained by
  ``tools/train_tokenizer.py`` or LLaMA's ``tokenizer.model``); ``eod`` is the model's ``</s>`` (eos) id;
  no BOS/EOS are added.
* :class:`HuggingFaceTokenizer`: a local Hugging Face tokenizer directory or a ``tokenizer.json`` file;
  ``eod`` is its eos token.
* :class:`NullTokenizer`: text is space-separated integer ids (for tests and pre-tokenized data); as in
  Megatron-LM, ``NullTokenizer(vocab_size=N)`` accepts ids ``0..N-1``, its ``eod`` is ``N`` and its
  ``vocab_size`` is ``N + 1``.

:func:`build_tokenizer` builds one from Megatron-style ``--tokenizer-type`` names.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = [
    "TOKENIZER_TYPES",
    "AbstractTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "build_tokenizer",
]


class AbstractTokenizer(ABC):
    """The interface every tokenizer here implements."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts (subclasses may batch this in native code)."""
        return [self.tokenize(t) for t in texts]

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (all ids are in ``[0, vocab_size)``)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id appended by ``preprocess_data.py --append-eod``."""


class SentencePieceTokenizer(AbstractTokenizer):
    """A SentencePiece model file. ``eod`` is the eos id (``</s>``)."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model {model_file!r} not found")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self._eod = int(self._sp.eos_id())
        if self._eod < 0:
            raise ValueError(
                f"{model_file}: the SentencePiece model has no eos piece to use as end-of-document"
            )

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        return int(self._sp.bos_id())

    @property
    def pad(self) -> int:
        return int(self._sp.pad_id())

    def __getstate__(self) -> str:
        return self.model_file

    def __setstate__(self, state: str) -> None:
        self.__init__(state)


_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


class HuggingFaceTokenizer(AbstractTokenizer):
    """A local Hugging Face tokenizer: a directory (``AutoTokenizer``) or a ``tokenizer.json`` file.

    ``eod`` is the tokenizer's eos token, else the first of ``</s>``, ``<|endoftext|>``, ... in its vocab.
    ``vocab_size`` is ``len(tokenizer)`` (base vocabulary plus added tokens).
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if os.path.isdir(path):
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        elif os.path.isfile(path):
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            raise FileNotFoundError(f"Hugging Face tokenizer {path!r} is neither a directory nor a file")
        self.path = path
        self._tok = tok
        tok.model_max_length = int(1e30)  # whole documents are tokenized: no "sequence too long" warnings
        eod = tok.eos_token_id
        if eod is None:
            vocab = tok.get_vocab()
            eod = next((vocab[name] for name in _EOS_CANDIDATES if name in vocab), None)
        if eod is None:
            raise ValueError(
                f"{path}: the tokenizer defines no eos token and none of "
                f"{list(_EOS_CANDIDATES)} is in its vocab"
            )
        self._eod = int(eod)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._eod

    def __getstate__(self) -> str:
        return self.path

    def __setstate__(self, state: str) -> None:
        self.__init__(state)


class NullTokenizer(AbstractTokenizer):
    """Text is whitespace-separated integer ids in ``[0, vocab_size)``; ``eod = vocab_size`` and the
    reported ``vocab_size`` is ``vocab_size + 1`` (Megatron-LM's ``NullTokenizer`` convention)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(f"NullTokenizer needs a positive vocab_size, got {vocab_size!r}")
        self._n = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError as exc:
            raise ValueError(f"NullTokenizer expects space-separated integers: {exc}") from None
        for i in ids:
            if not 0 <= i < self._n:
                raise ValueError(f"NullTokenizer id {i} outside [0, {self._n})")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n


#: ``--tokenizer-type`` values and the class each builds (``GPTSentencePieceTokenizer`` is Megatron's name
#: for the same eos-as-eod SentencePiece behaviour).
TOKENIZER_TYPES: dict[str, type[AbstractTokenizer]] = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "GPTSentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "NullTokenizer": NullTokenizer,
}


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None
) -> AbstractTokenizer:
    """Build a tokenizer from Megatron's ``--tokenizer-type`` / ``--tokenizer-model`` / ``--vocab-size``."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"unknown tokenizer type {tokenizer_type!r}; allowed: {', '.join(sorted(TOKENIZER_TYPES))}"
        )
    cls = TOKENIZER_TYPES[tokenizer_type]
    if cls is NullTokenizer:
        if vocab_size is None:
            raise ValueError("NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    if not tokenizer_model:
        raise ValueError(f"{tokenizer_type} needs --tokenizer-model (a file or directory)")
    return cls(tokenizer_model)
