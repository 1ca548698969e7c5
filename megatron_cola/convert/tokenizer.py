"""Tokenizers of exported models: a SentencePiece model as a ``tokenizers`` fast tokenizer, or an HF one.

A checkpoint names its tokenizer as ``{"type": ..., "model": path}``. SentencePiece models
(``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``) become a
``tokenizer.json`` built here from the model's own settings (BPE or unigram pieces, byte fallback,
NFKC charsmap, whitespace handling, dummy prefix), so ``AutoTokenizer`` encodes exactly like
``SentencePieceProcessor.encode`` and no BOS is added (Megatron-style pre-training separates documents by
the end-of-document token only); ``tokenizer.model`` is copied beside it. ``HuggingFaceTokenizer``
folders are loaded and saved again. The end-of-document token (SentencePiece's EOS, an HF tokenizer's
``eos_token``) is the EOS of the exported generation config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

from megatron_cola.errors import ConversionError

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
HF_TYPES = ("HuggingFaceTokenizer",)

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerSpec:
    """Where a tokenizer lives and what kind it is: ``kind`` is ``"sentencepiece"`` or ``"hf"``."""

    kind: str
    path: str

    @classmethod
    def from_info(cls, info: dict[str, Any] | None, override: str | None = None) -> TokenizerSpec | None:
        """From a checkpoint's ``tokenizer`` record, or from ``override`` (a ``.model`` file or an HF
        tokenizer folder). ``None`` when there is neither."""
        if override:
            kind = "hf" if os.path.isdir(override) else "sentencepiece"
            return cls(kind, override)
        if not info or not info.get("model"):
            return None
        kind_name = info.get("type", "")
        if kind_name in SENTENCEPIECE_TYPES:
            return cls("sentencepiece", info["model"])
        if kind_name in HF_TYPES:
            return cls("hf", info["model"])
        raise ConversionError(
            f"tokenizer type {kind_name!r} cannot be exported "
            f"(supported: {list(SENTENCEPIECE_TYPES + HF_TYPES)}); "
            "pass --tokenizer-model PATH or --no-tokenizer"
        )

    def check_exists(self) -> None:
        """Raise when a SentencePiece model file is missing (an HF tokenizer may also be a hub name, which
        ``AutoTokenizer`` resolves from its cache offline)."""
        if not os.path.exists(self.path) and (self.kind == "sentencepiece" or os.sep in self.path):
            raise ConversionError(
                f"tokenizer {self.path} (recorded in the checkpoint) does not exist here; pass "
                "--tokenizer-model PATH (a SentencePiece .model or an HF tokenizer folder) or --no-tokenizer"
            )


def _load_proto(model_path: str) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def sentencepiece_to_tokenizers(model_path: str) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the SentencePiece model at ``model_path``."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = _load_proto(model_path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == 1:  # unigram
        model = Unigram(
            [(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id, byte_fallback=byte_fallback
        )
    elif trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        # SentencePiece BPE merges the adjacent pair whose merged piece scores highest: rank every split of
        # a normal piece into two normal pieces by the merged piece's score.
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
        ranked = []
        for piece, (score, idx) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-score, idx, left, right))
        merges = [(left, right) for _, _, left, right in sorted(ranked)]
        model = BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=byte_fallback)
    else:
        raise ConversionError(
            f"{model_path}: SentencePiece model type {trainer.model_type} (word/char) cannot be converted; "
            "only unigram and BPE models can"
        )
    tok = Tokenizer(model)

    space = "▁" if norm.escape_whitespaces else " "
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # only prepends to non-empty text, as SentencePiece does
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
    if user_defined:  # emitted whole, never merged with their neighbours
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    steps = [decoders.Replace(space, " ")] if space != " " else []
    if byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def sentencepiece_to_hf(model_path: str) -> Any:
    """A ``transformers`` fast tokenizer for a SentencePiece model (BOS/EOS/UNK/PAD from its pieces)."""
    from transformers import PreTrainedTokenizerFast

    proto = _load_proto(model_path)
    trainer = proto.trainer_spec
    pieces = proto.pieces
    special: dict[str, str] = {}
    for key, idx in (
        ("bos_token", trainer.bos_id),
        ("eos_token", trainer.eos_id),
        ("pad_token", trainer.pad_id),
    ):
        if 0 <= idx < len(pieces):
            special[key] = pieces[idx].piece
    if 0 <= trainer.unk_id < len(pieces):
        special["unk_token"] = pieces[trainer.unk_id].piece
    hf = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_to_tokenizers(model_path), **special)
    others = [p.piece for p in pieces if p.type == _CONTROL and p.piece not in special.values()]
    if others:
        hf.add_special_tokens({"additional_special_tokens": others})
    return hf


def load_hf_tokenizer(spec: TokenizerSpec) -> Any:
    """The ``transformers`` tokenizer of ``spec``."""
    spec.check_exists()
    if spec.kind == "sentencepiece":
        return sentencepiece_to_hf(spec.path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path)


def special_token_ids(spec: TokenizerSpec, eod: int | None = None) -> dict[str, int | None]:
    """``bos``/``eos``/``pad`` ids for the exported configs; ``eos`` is the end-of-document token."""
    if spec.kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=spec.path)
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
        ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
    else:
        tok = load_hf_tokenizer(spec)
        ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    if eod is not None:
        ids["eos"] = eod
    return ids


def tokenizer_vocab_size(spec: TokenizerSpec) -> int:
    if spec.kind == "sentencepiece":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=spec.path).vocab_size()
    return len(load_hf_tokenizer(spec))


def save_tokenizer(spec: TokenizerSpec, out_dir: str) -> None:
    """Write the tokenizer files into ``out_dir`` so that ``AutoTokenizer.from_pretrained(out_dir)`` works."""
    tok = load_hf_tokenizer(spec)
    tok.save_pretrained(out_dir)
    if spec.kind == "sentencepiece":
        shutil.copyfile(spec.path, os.path.join(out_dir, "tokenizer.model"))
        # Name the class every transformers version knows (5.x writes its new backend class name).
        config_path = os.path.join(out_dir, "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("backend", None)
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
