#!/usr/bin/env python3
"""A checkpoint's layout (TP size and scheme, DP size, ZeRO stage, dtype), iteration, consumed samples,
size, manifest status and the layouts it can be resumed on.

    python tools/checkpoint_info.py DIR [--json] [--no-verify]

``DIR``: a ``--save`` directory (its ``latest`` checkpoint) or one ``iter_*`` directory. Exit status 0
ok, 1 manifest missing or not verifying, 2 usage error. See ``megatron_cola/cli/checkpoint_info.py``.
"""

import sys

from megatron_cola.cli.checkpoint_info import main

if __name__ == "__main__":
    sys.exit(main())
