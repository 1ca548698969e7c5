"""Dataset loader of the bundled lm-eval task ``sample_cloze`` (``custom_dataset`` of its YAMLs).

lm-eval hands ``datasets.load_dataset("json", data_files=...)`` paths through unchanged, so a relative
``data_files`` would be read from the current directory. This loader resolves the YAML's ``data_files``
against this directory, so the task works from anywhere, offline (the JSONL files sit beside it).
"""

from __future__ import annotations

import os
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_files: dict[str, str] | None = None, **_metadata: Any) -> Any:
    """``DatasetDict`` of the JSONL ``data_files`` (split -> file name beside this module)."""
    import datasets

    files = {split: os.path.join(_HERE, name) for split, name in (data_files or {}).items()}
    return datasets.load_dataset("json", data_files=files)
