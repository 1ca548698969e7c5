"""The parser generated from ``TrainConfig``'s fields against a snapshot of ``pretrain_cola.py``'s flags.

``tests/snapshots/pretrain_cola_flags.json`` was taken from the hand-written parser before it was replaced
by the generated one (the only difference since: the new ``--config``). A flag whose name, default, type,
choices or help changes fails here; a new flag is added to the snapshot on purpose:

    python -m tests.test_config_snapshot   # rewrites the snapshot from the current parser
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_cola.training.arguments import build_parser

SNAPSHOT = Path(__file__).parent / "snapshots" / "pretrain_cola_flags.json"


def parser_flags() -> dict[str, dict[str, Any]]:
    """Every argument of the parser by ``dest``: what a user sees of it and what it parses to."""
    out = {}
    for a in build_parser()._actions:
        if a.dest == "help":
            continue
        out[a.dest] = {
            "option_strings": list(a.option_strings),
            "action": type(a).__name__,
            "default": a.default,
            "type": getattr(a.type, "__name__", None),
            "choices": list(a.choices) if a.choices is not None else None,
            "nargs": a.nargs,
            "metavar": a.metavar,
            "help": a.help,
        }
    return out


def test_generated_parser_matches_the_snapshot() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    actual = json.loads(json.dumps(parser_flags()))  # the same JSON round trip as the snapshot's
    assert sorted(actual) == sorted(expected), "flags added or removed: update the snapshot on purpose"
    for dest, spec in expected.items():
        assert actual[dest] == spec, dest


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(parser_flags(), indent=1, sort_keys=True) + "\n")
