#!/usr/bin/env python3
"""Peak host memory (``ru_maxrss``) of each rank at start-up, in two phases: after the model is built
and initialised, and after the optimizer and DeepSpeed engine are built (no step taken). Run it like
``pretrain_cola.py``, with the same flags (CPU, gloo):

    torchrun --standalone --nproc_per_node 2 benchmarks/startup_memory.py --model-size 1B \\
        --zero-stage 3 --device cpu --data-path PREFIX --tokenizer-type NullTokenizer --vocab-size 32000 \\
        --train-iters 1 [--no-zero-init]

``--no-zero-init`` builds the whole model on every rank first (the start-up before ZeRO-3 partitioned
the model as it is built), for comparison. Rank 0 prints one JSON line with the GiB of every rank.
"""

from __future__ import annotations

import json
import resource
import sys

import torch
import torch.distributed as dist

from megatron_cola.data import build_tokenizer
from megatron_cola.parallel import ParallelState, pad_vocab_size
from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
from megatron_cola.training.ds_config import build_ds_config
from megatron_cola.training.engine import (
    build_engine,
    build_parallel_model,
    compile_mode_of,
    use_deepspeed_accelerator,
)


def _max_rss_gib() -> list[float]:
    """Every rank's peak resident memory so far, in GiB."""
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])  # KiB -> GiB
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [round(float(t), 2) for t in gathered]


def main() -> None:
    use_deepspeed_accelerator("cpu")  # before DeepSpeed is imported: a GPU box must not move it to cuda
    import deepspeed

    argv = sys.argv[1:]
    zero_init = "--no-zero-init" not in argv
    cfg = build_train_config(parse_args([a for a in argv if a != "--no-zero-init"]))
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_size)
    tp = cfg.tensor_model_parallel_size
    vocab = pad_vocab_size(tokenizer.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    model_args = model_args_from(cfg, vocab)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    parallel = ParallelState.from_torch_distributed(tp)
    device = torch.device("cpu")
    start = _max_rss_gib()
    ds_config = build_ds_config(cfg, device.type)
    zero3 = ds_config if cfg.zero_stage == 3 and zero_init else None
    model = build_parallel_model(
        cfg.seed,
        model_args,
        parallel,
        device,
        zero3_config=zero3,
        scheme=cfg.cola_tp_scheme,
        compile_mode=compile_mode_of(cfg),
    )
    after_model = _max_rss_gib()
    build_engine(cfg, model, parallel, device, ds_config)
    after_engine = _max_rss_gib()
    if dist.get_rank() == 0:
        out = {
            "zero_stage": cfg.zero_stage,
            "zero_init": zero3 is not None,
            "params_m": round(model_args.num_params() / 1e6, 1),
            "max_rss_gib_before_model": start,
            "max_rss_gib_after_model": after_model,
            "max_rss_gib_after_engine": after_engine,
        }
        print(json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
