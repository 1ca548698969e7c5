#!/usr/bin/env python3
"""Parameters, training FLOPs per token and measured saved activations of a CoLA / LLaMA size.

python tools/model_info.py --model-size 1B [--full-rank] [--recompute cola-m] [--seq-length 256] [--json]
python tools/model_info.py --table          # markdown table of every paper size, CoLA vs full rank
"""

import sys

from megatron_cola.cli.model_info import main

if __name__ == "__main__":
    sys.exit(main())
