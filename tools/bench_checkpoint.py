#!/usr/bin/env python3
"""What the checkpoint manifest costs: ``save_checkpoint`` time and the manifest's share of it; with
``--async``, how long ``--async-save`` blocks training compared with a synchronous save.

    python tools/bench_checkpoint.py --model-size 1B --data-path PREFIX --save-dir /tmp/bench_ckpt [--async]

One process (world 1, gloo, CPU), a DeepSpeed engine as ``pretrain_cola.py`` builds it (ZeRO-1, bf16 by
default), one optimizer step so that the Adam states exist, then ``--saves`` timed saves. The manifest's
time is measured by hashing the just-written checkpoint again (``write_manifest``, page cache as warm as
during the save); the overhead is manifest / (save - manifest). Also prints xxh3-128 and crc32 speeds on
the largest file. Each saved checkpoint is deleted after it was measured.

``--async`` then makes ``--saves`` background saves in the same process: the time ``save_checkpoint``
takes to return (the snapshot into host memory), training steps run while the background writer works,
and the time the next ``wait`` still blocks. Training is blocked for snapshot + wait per save; the
ratio to the mean synchronous save is printed.

``--layout-free`` measures what the layout-free optimizer state (``optim_tpNN.pt``, written by default;
``--no-save-reshardable-optim`` skips it) costs: ``--saves`` saves without it and as many with it (time
and size of each), then the time to read it back into the engine as a resume on another layout does
(``load_optim_files`` + ``restore_optimizer_state``).
"""

import sys

from megatron_cola.cli.bench_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
