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

from __future__ import annotations

import argparse
import os
import shutil
import time
import zlib

import torch
import torch.distributed as dist


def _rate(path: str, fn) -> float:
    size = os.path.getsize(path)
    start = time.perf_counter()
    fn(path)
    return size / (time.perf_counter() - start) / 1e9


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="1B")
    p.add_argument("--data-path", required=True, help="any .bin/.idx prefix (only opened, not trained on)")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--saves", type=int, default=2)
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16")
    p.add_argument("--async", dest="async_save", action="store_true", help="also time --async-save")
    p.add_argument(
        "--layout-free", action="store_true", help="time saves with and without optim_tpNN.pt, and its load"
    )
    a = p.parse_args(argv)

    from megatron_cola.checkpoint.manifest import file_digest, write_manifest
    from megatron_cola.parallel import ParallelState
    from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
    from megatron_cola.training.checkpointing import AsyncSaves, save_checkpoint
    from megatron_cola.training.ds_config import build_ds_config
    from megatron_cola.training.engine import build_engine, build_parallel_model
    from megatron_cola.training.pretrain import init_distributed

    flags = ["--model-size", a.model_size, "--data-path", a.data_path, "--tokenizer-type", "NullTokenizer"]
    flags += ["--vocab-size", "32000", "--seq-length", "16", "--micro-batch-size", "1"]
    flags += ["--global-batch-size", "1", "--train-iters", "10", "--lr-warmup-iters", "1"]
    flags += ["--save", a.save_dir, "--zero-stage", "1", "--device", "cpu", *([] if a.fp32 else ["--bf16"])]
    cfg = build_train_config(parse_args(flags), world_size=1)
    model_args = model_args_from(cfg, 32000)
    device = torch.device("cpu")
    init_distributed(device)
    parallel = ParallelState.from_torch_distributed(1)
    model = build_parallel_model(cfg.seed, model_args, parallel, device)
    engine, _ = build_engine(cfg, model, parallel, device, build_ds_config(cfg, device.type))
    tokens = torch.randint(0, 32000, (1, 16))

    def train_step() -> None:
        engine.backward(engine(tokens, tokens))
        engine.step()

    train_step()
    print(
        f"model {a.model_size}: {model_args.num_params() / 1e6:.1f}M params, {'fp32' if a.fp32 else 'bf16'}"
    )
    if a.layout_free:
        _bench_layout_free(a.saves, engine, cfg, model_args, parallel)
        dist.destroy_process_group()
        return
    sync_times = []
    for i in range(1, a.saves + 1):
        start = time.perf_counter()
        path = save_checkpoint(engine, cfg, model_args, parallel, i, i, None, 32000, {})
        total = time.perf_counter() - start
        sync_times.append(total)
        manifest = write_manifest(path, i)
        size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
        print(
            f"save {i}: {size / 1e9:.2f} GB in {total:.2f} s (manifest {manifest:.2f} s): manifest overhead "
            f"{100 * manifest / (total - manifest):.1f}% of the save without it"
        )
        if i == a.saves:
            big = max((os.path.join(path, n) for n in os.listdir(path)), key=os.path.getsize)
            xxh, crc = _rate(big, file_digest), _rate(big, _crc32)
            print(
                f"largest file {os.path.getsize(big) / 1e9:.2f} GB: xxh3-128 {xxh:.1f} GB/s, "
                f"crc32 {crc:.1f} GB/s"
            )
        shutil.rmtree(path)
    if a.async_save:
        _bench_async(
            a.saves,
            sync_times,
            train_step,
            lambda i, saves: save_checkpoint(
                engine, cfg, model_args, parallel, i, i, None, 32000, {}, saves=saves
            ),
            AsyncSaves(),
        )
    dist.destroy_process_group()


def _bench_layout_free(n: int, engine, cfg, model_args, parallel) -> None:
    """``n`` saves without ``optim_tpNN.pt`` and ``n`` with it, then its load into the engine."""
    import dataclasses

    from megatron_cola.checkpoint import CheckpointReader
    from megatron_cola.checkpoint.optim_state import load_optim_files, restore_optimizer_state
    from megatron_cola.training.checkpointing import save_checkpoint

    def dir_size(path: str) -> int:
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

    results: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for i in range(1, 2 * n + 1):
        layout_free = i > n
        run_cfg = dataclasses.replace(cfg, no_save_reshardable_optim=not layout_free)
        start = time.perf_counter()
        path = save_checkpoint(engine, run_cfg, model_args, parallel, i, i, None, 32000, {})
        results[layout_free].append((time.perf_counter() - start, dir_size(path)))
        print(f"save {i} ({'with' if layout_free else 'without'} optim_tp00.pt): {results[layout_free][-1]}")
        if i == 2 * n:
            start = time.perf_counter()
            files = load_optim_files(CheckpointReader(cfg.save, i))
            count, _ = restore_optimizer_state(engine, files)
            load = time.perf_counter() - start
            extra = os.path.getsize(os.path.join(path, "optim_tp00.pt"))
        shutil.rmtree(path)
    (t0, s0), (t1, s1) = ([sum(x) / n for x in zip(*results[k], strict=True)] for k in (False, True))
    print(
        f"without optim_tp00.pt: {s0 / 1e9:.2f} GB, save {t0:.2f} s; with it: {s1 / 1e9:.2f} GB "
        f"(+{extra / 1e9:.2f} GB, +{100 * extra / s0:.0f}%), save {t1:.2f} s; reading it back into the "
        f"engine ({count} tensors): {load:.2f} s"
    )


def _bench_async(n: int, sync_times: list[float], train_step, save, saves) -> None:
    """``n`` background saves; training steps run while each is written."""
    blocked_times = []
    for i in range(n + 1, 2 * n + 1):
        start = time.perf_counter()
        path = save(i, saves)
        snap = time.perf_counter() - start
        bg = saves.pending
        steps, step_time = 0, 0.0
        while not bg.done():
            t = time.perf_counter()
            train_step()
            step_time += time.perf_counter() - t
            steps += 1
        waited = saves.wait()
        blocked = snap + waited
        blocked_times.append(blocked)
        print(
            f"async save {i - n}: training blocked {blocked:.2f} s (snapshot {snap:.2f} s + wait "
            f"{waited:.2f} s); written in the background in {bg.seconds:.2f} s while {steps} training "
            f"step(s) ran ({step_time:.2f} s)"
        )
        shutil.rmtree(path)
    mean_sync, mean_blocked = sum(sync_times) / len(sync_times), sum(blocked_times) / len(blocked_times)
    print(
        f"blocked per save: async {mean_blocked:.2f} s vs synchronous {mean_sync:.2f} s = "
        f"{mean_blocked / mean_sync:.3f}x"
    )
