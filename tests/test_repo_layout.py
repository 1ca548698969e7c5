"""The repository keeps what the README's commands write out of ``git status``: every output path they
name (``--save``, ``--model-prefix``, ``--output-prefix``, ``--tensorboard-dir``, ``runs/...``) and the
launchers' default ``SAVE_DIR`` are git-ignored, as is the test-data cache."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FLAGS = ("--save", "--model-prefix", "--output-prefix", "--tensorboard-dir", "--output-dir")
# Named by the README's prose and the launchers rather than by a flag.
ALWAYS = ("runs/quickstart/cola", "runs/compare/table.md", "checkpoints/cola_60M", ".cache/test-data/x")


def readme_outputs(text: str) -> set[str]:
    """The top-level directories of the paths the README's commands write (``tok/llama32k`` -> ``tok``)."""
    flags = "|".join(re.escape(f) for f in OUTPUT_FLAGS)
    paths = re.findall(rf"(?:{flags})[ =]([\w./-]+)", text)
    return {p.split("/")[0] for p in paths if "/" in p and not p.startswith(("/", "$", "."))}


def _ignored(path: str) -> bool:
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode not in (0, 1):
        pytest.skip(f"git check-ignore failed: {proc.stderr.strip()}")
    return proc.returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_readme_output_paths_are_git_ignored() -> None:
    tops = readme_outputs((ROOT / "README.md").read_text())
    assert {"tok", "ckpt", "hf", "data"} <= tops, tops  # the parser still finds the README's outputs
    paths = [f"{top}/x" for top in sorted(tops)] + list(ALWAYS)
    assert [p for p in paths if not _ignored(p)] == []


def test_readme_outputs_parser() -> None:
    text = "python t.py --save ckpt/a --model-prefix tok/b --load hf/c --output-prefix=data/c4 --save x"
    assert readme_outputs(text) == {"ckpt", "tok", "data"}
