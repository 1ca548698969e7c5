"""A checkpoint's layout, iteration, consumed samples, size, manifest status and what it resumes on.

    python tools/checkpoint_info.py DIR [--json] [--no-verify]

``DIR`` is a ``--save`` directory (the checkpoint ``latest`` names is shown) or one ``iter_*`` directory.
The manifest's checksums are verified unless ``--no-verify``. Exit status: 0 when the checkpoint is
complete and verifies (or ``--no-verify``), 1 when its manifest is missing or does not verify, or a file
cannot be read, 2 for a usage error (bad flags, ``DIR`` holds no checkpoint). The logic is in
``megatron_cola/checkpoint/info.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_cola.checkpoint.info import checkpoint_info, format_info, resolve
from megatron_cola.errors import MegatronColaError

USAGE_ERROR = 2
CHECKPOINT_PROBLEM = 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="checkpoint_info.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("dir", metavar="DIR", help="a --save directory or one iter_* checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-verify", action="store_true", help="do not check the files against the manifest")
    ns = p.parse_args(argv)
    try:
        resolve(ns.dir)
    except MegatronColaError as e:
        print(f"checkpoint_info.py: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    try:
        info = checkpoint_info(ns.dir, verify=not ns.no_verify)
    except (MegatronColaError, OSError) as e:
        print(f"checkpoint_info.py: error: {e}", file=sys.stderr)
        return CHECKPOINT_PROBLEM
    print(json.dumps(info, indent=1) if ns.json else format_info(info))
    return CHECKPOINT_PROBLEM if info["manifest"]["problems"] else 0
