"""The training side of the data: datasets from a ``TrainConfig``, data-parallel loaders, batch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megatron_cola.errors import DataError, MegatronColaError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.train_config import TrainConfig


def build_datasets(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """Train, validation and test datasets (``None`` where the split is empty), sized for the whole run."""
    from megatron_cola.data import build_train_valid_test_datasets

    gbs = cfg.global_batch_size
    evals = cfg.train_iters // cfg.eval_interval + 1
    num_samples = (cfg.train_iters * gbs, evals * cfg.eval_iters * gbs, cfg.eval_iters * gbs)
    try:
        return build_train_valid_test_datasets(
            list(cfg.data_path), cfg.split, cfg.seq_length, num_samples, cfg.seed, cfg.data_cache_path
        )
    except MegatronColaError:
        raise
    except (ValueError, FileNotFoundError) as e:  # the data layer's messages name the flag or file
        raise DataError(str(e)) from e


def make_loader(
    cfg: TrainConfig, dataset: Any, consumed_samples: int, parallel: ParallelState
) -> torch.utils.data.DataLoader:
    """Micro-batches of this data-parallel rank, starting after ``consumed_samples`` global samples."""
    from megatron_cola.data import PretrainingSampler

    sampler = PretrainingSampler(
        len(dataset), consumed_samples, cfg.micro_batch_size, parallel.dp_rank, parallel.dp_size
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=False
    )


def check_token_ids(dataset: Any, vocab_size: int, cfg: TrainConfig, probe: int = 64) -> None:
    """Fail early (not with an embedding index error mid-run) when the data was tokenized differently."""
    n = min(len(dataset), probe)
    top = max(int(np.max(dataset[i]["text"])) for i in range(n)) if n else 0
    if top >= vocab_size:
        raise DataError(
            f"--data-path holds token id {top}, but the tokenizer ({cfg.tokenizer_type} "
            f"{cfg.tokenizer_model or ''}) has only {vocab_size} ids: preprocess the data with the same "
            "tokenizer you train with"
        )


def tokens_and_labels(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a micro-batch, on ``device``."""
    text = torch.as_tensor(batch["text"]).long().to(device, non_blocking=True)  # (mbs, seq + 1)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()
