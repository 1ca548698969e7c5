"""Both CoLA tensor-parallel schemes train what TP=1 trains, and their checkpoints load across layouts.

One 4-process gloo job (``mp.spawn``) runs every case, so the suite pays for one launch:

- 5 fp32 training steps (DeepSpeed engine, AdamW, gradient clipping through our mpu) at TP=2 × DP=2
  and TP=4 × DP=1 under ``split-rank`` and ``bottleneck``, covering CoLA and CoLA-M, plain and grouped
  projections, ZeRO-1 and ZeRO-3, each against the TP=1 × DP=4 run of the same model on the same
  global batches: losses equal within 2e-4.
- A checkpoint saved under one scheme and TP size loads (``load_weights_only``: ``--finetune``) under
  the other scheme, another TP size and TP=1, with the first-step loss equal to the saving run's.

Each rank writes its results as JSON; the tests read rank 0's (losses are data-parallel means).
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_cola.parallel import ParallelState

pytestmark = pytest.mark.slow

WORLD = 4
STEPS = 5
GLOBAL_BATCH = 4
SEQ = 32
VOCAB = 256
TOLERANCE = 2e-4

# name: (tp, scheme, recompute, grouped, zero stage); TP=1 references are named by their model variant.
CASES: dict[str, tuple[int, str, str, bool, int]] = {
    "ref_plain_none": (1, "split-rank", "none", False, 1),
    "ref_plain_colam": (1, "split-rank", "cola-m", False, 1),
    "ref_grouped_none": (1, "split-rank", "none", True, 1),
    "ref_grouped_colam": (1, "split-rank", "cola-m", True, 1),
    "split_tp2_plain_none_z1": (2, "split-rank", "none", False, 1),
    "split_tp4_grouped_colam_z3": (4, "split-rank", "cola-m", True, 3),
    "bottleneck_tp2_plain_colam_z3": (2, "bottleneck", "cola-m", False, 3),
    "bottleneck_tp4_grouped_none_z1": (4, "bottleneck", "none", True, 1),
    "bottleneck_tp2_grouped_colam_z1": (2, "bottleneck", "cola-m", True, 1),
    "split_tp4_plain_colam_z1": (4, "split-rank", "cola-m", False, 1),
}
SAVED_CASE = "bottleneck_tp2_plain_colam_z3"  # its checkpoint is loaded under the layouts below
LOADS = {"split_tp4": (4, "split-rank"), "split_tp2": (2, "split-rank"), "tp1": (1, "split-rank")}


def _reference(name: str) -> str:
    _, _, recompute, grouped, _ = CASES[name]
    return f"ref_{'grouped' if grouped else 'plain'}_{'colam' if recompute == 'cola-m' else 'none'}"


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _flags(prefix: str, tp: int, scheme: str, recompute: str, grouped: bool, zero: int) -> list[str]:
    dp = WORLD // tp
    flags = ["--model-size", "debug", "--num-layers", "2", "--data-path", prefix]
    flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB)]
    flags += ["--make-vocab-size-divisible-by", "64"]  # the same padded vocab (256) at TP=1, 2 and 4
    flags += ["--seq-length", str(SEQ), "--micro-batch-size", str(GLOBAL_BATCH // dp)]
    flags += ["--global-batch-size", str(GLOBAL_BATCH), "--train-iters", "20", "--lr", "2e-3"]
    flags += ["--lr-warmup-iters", "1", "--clip-grad", "0.5", "--seed", "11", "--device", "cpu"]
    flags += ["--tensor-model-parallel-size", str(tp), "--cola-tp-scheme", scheme]
    flags += ["--recompute", recompute, "--zero-stage", str(zero)]
    return flags + (["--grouped-projections"] if grouped else [])


def _dp_mean(x: torch.Tensor, parallel: ParallelState) -> float:
    x = x.detach().clone()
    dist.all_reduce(x, group=parallel.dp_group)
    return x.item() / parallel.dp_size


def _micro(step: int, parallel: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, labels = _global_batch(step)
    n = GLOBAL_BATCH // parallel.dp_size
    rows = slice(parallel.dp_rank * n, (parallel.dp_rank + 1) * n)
    return tokens[rows], labels[rows]


def _run_case(name: str, prefix: str, save_dir: str | None) -> dict:
    from megatron_cola.parallel import tp_split_dims
    from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
    from megatron_cola.training.checkpointing import save_checkpoint
    from megatron_cola.training.ds_config import build_ds_config
    from megatron_cola.training.engine import build_engine, build_parallel_model

    tp, scheme, recompute, grouped, zero = CASES[name]
    flags = _flags(prefix, tp, scheme, recompute, grouped, zero) + (["--save", save_dir] if save_dir else [])
    cfg = build_train_config(parse_args(flags), world_size=WORLD)
    model_args = model_args_from(cfg, VOCAB)
    parallel = ParallelState.from_torch_distributed(tp)
    cpu = torch.device("cpu")
    ds_config = build_ds_config(cfg, "cpu")
    model = build_parallel_model(
        cfg.seed, model_args, parallel, cpu, ds_config if zero == 3 else None, scheme=scheme
    )
    engine, _ = build_engine(cfg, model, parallel, cpu, ds_config)
    losses = []
    for step in range(STEPS):
        loss = engine(*_micro(step, parallel))
        engine.backward(loss)
        engine.step()
        losses.append(_dp_mean(loss, parallel))
    result = {"losses": losses}
    if save_dir:
        with torch.no_grad():
            result["next_loss"] = _dp_mean(engine(*_micro(STEPS, parallel)), parallel)
        save_checkpoint(
            engine,
            cfg,
            model_args,
            parallel,
            iteration=STEPS,
            consumed_samples=STEPS * GLOBAL_BATCH,
            tokenizer_info=None,
            vocab_size=VOCAB,
            split_dims=tp_split_dims(engine.module),
            tp_scheme=engine.module.sharding.scheme,
        )
    return result


def _load_and_score(load: str, prefix: str, save_dir: str) -> float:
    """``--finetune``'s weights-only load into ``load``'s layout, then the first step's loss."""
    from megatron_cola.checkpoint.weights import load_weights_only
    from megatron_cola.training.arguments import build_train_config, model_args_from, parse_args
    from megatron_cola.training.engine import build_parallel_model

    tp, scheme = LOADS[load]
    _, _, recompute, grouped, _ = CASES[SAVED_CASE]
    flags = _flags(prefix, tp, scheme, recompute, grouped, 1)
    cfg = build_train_config(parse_args([*flags, "--load", save_dir, "--finetune"]), world_size=WORLD)
    model_args = model_args_from(cfg, VOCAB)
    parallel = ParallelState.from_torch_distributed(tp)
    model = build_parallel_model(cfg.seed + 1, model_args, parallel, torch.device("cpu"), scheme=scheme)
    load_weights_only(model, save_dir, seed=cfg.seed, init_std=model_args.init_std)
    assert model.sharding.scheme == ("none" if tp == 1 else scheme)
    with torch.no_grad():
        return _dp_mean(model(*_micro(STEPS, parallel)), parallel)


def _worker(rank: int, port: int, out_dir: str, prefix: str) -> None:
    import deepspeed

    from megatron_cola.training.engine import use_deepspeed_accelerator

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)
    use_deepspeed_accelerator("cpu")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results: dict = {}
    try:
        for name in CASES:
            save_dir = str(Path(out_dir, "ckpt")) if name == SAVED_CASE else None
            results[name] = _run_case(name, prefix, save_dir)
        for load in LOADS:
            results[f"load_{load}"] = _load_and_score(load, prefix, str(Path(out_dir, "ckpt")))
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, synthetic_prefix: str) -> dict:
    out = tmp_path_factory.mktemp("tp_schemes")
    os.environ["OMP_NUM_THREADS"] = "1"
    error = ""
    try:
        mp.spawn(_worker, args=(_free_port(), str(out), synthetic_prefix), nprocs=WORLD, join=True)
    except Exception as e:  # reported by the tests below, with the rank's traceback
        error = "".join(p.read_text() for p in sorted(out.glob("*.err"))) or str(e)
    path = out / "rank0.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["_error"] = error
    return data


def _get(results: dict, name: str) -> Any:
    if name not in results:
        pytest.fail(f"{name} was not reached: {results['_error'][-3000:]}")
    return results[name]


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("ref_")])
def test_training_equals_tp1(results: dict, name: str) -> None:
    losses = _get(results, name)["losses"]
    reference = _get(results, _reference(name))["losses"]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= TOLERANCE, (losses, reference)
    assert losses[-1] < losses[0]  # it trains


def test_references_agree(results: dict) -> None:
    """The four TP=1 variants compute the same model (CoLA-M and grouping change no math)."""
    base = _get(results, "ref_plain_none")["losses"]
    for name in ("ref_plain_colam", "ref_grouped_none", "ref_grouped_colam"):
        assert max(abs(a - b) for a, b in zip(_get(results, name)["losses"], base)) <= TOLERANCE


@pytest.mark.parametrize("load", list(LOADS))
def test_checkpoint_loads_across_schemes_and_tp(results: dict, load: str) -> None:
    expected = _get(results, SAVED_CASE)["next_loss"]
    assert abs(_get(results, f"load_{load}") - expected) <= TOLERANCE
