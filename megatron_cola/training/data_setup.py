"""The training side of the data: datasets from a ``TrainConfig``, data-parallel loaders, batch tensors."""

from __future__ import annotations

from typing import Any

import torch

from megatron_cola.errors import DataError, MegatronColaError
from megatron_cola.parallel import ParallelState
from megatron_cola.training.logging_utils import print_rank_0
from megatron_cola.training.train_config import TrainConfig


def build_datasets(cfg: TrainConfig, vocab_size: int, eod: int | None = None) -> tuple[Any, Any, Any]:
    """Train, validation and test datasets (``None`` where the split is empty), sized for the whole run.

    With ``eod`` (the run's tokenizer's), each dataset's ``.meta.json`` tokenizer record is first checked
    against the run's tokenizer (:class:`DataError` naming both; a one-line note for datasets without one).
    Every sample's token ids are bound-checked against the tokenizer's ``vocab_size`` as it is read, so data
    tokenized with another tokenizer stops the run with a message naming the file, document and id."""
    from megatron_cola.data import build_train_valid_test_datasets, parse_data_path
    from megatron_cola.data.sidecar import check_data_tokenizers, tokenizer_record

    if eod is not None:
        run = tokenizer_record(cfg.tokenizer_type, cfg.tokenizer_model, vocab_size, eod)
        for note in check_data_tokenizers(parse_data_path(list(cfg.data_path))[0], run):
            print_rank_0(note)

    gbs = cfg.global_batch_size
    evals = cfg.train_iters // cfg.eval_interval + 1
    num_samples = (cfg.train_iters * gbs, evals * cfg.eval_iters * gbs, cfg.eval_iters * gbs)
    try:
        return build_train_valid_test_datasets(
            list(cfg.data_path),
            cfg.split,
            cfg.seq_length,
            num_samples,
            cfg.seed,
            cfg.data_cache_path,
            vocab_size=vocab_size,
        )
    except MegatronColaError:
        raise
    except (ValueError, FileNotFoundError) as e:  # the data layer's messages name the flag or file
        raise DataError(str(e)) from e


def _split_sizes(dataset: Any) -> tuple[int, int, int]:
    """``(documents, samples, epochs)`` of a ``GPTDataset``, or of a ``BlendedDataset`` (its components'
    documents, its own samples, the most epochs of any component)."""
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        sizes = [_split_sizes(part) for part in parts]
        return sum(d for d, _, _ in sizes), len(dataset), max(e for _, _, e in sizes)
    documents = int(dataset.documents.size)
    return documents, len(dataset), int(dataset.document_index.size) // documents


def describe_datasets(train: Any, valid: Any, test: Any) -> list[str]:
    """One line per built split (``train``, ``validation``, ``test``), as Megatron summarises its
    datasets: ``> train split: 540 documents, 1650 samples, 3 epochs``. The samples are those indexed
    (whole epochs: at least what the run reads); the epochs are how many passes over the split's
    documents they take."""
    lines = []
    for name, dataset in (("train", train), ("validation", valid), ("test", test)):
        if dataset is None:
            continue
        parts = getattr(dataset, "datasets", None)
        documents, samples, epochs = _split_sizes(dataset)
        blend = f" ({len(parts)} datasets blended)" if parts else ""
        lines.append(
            f"> {name} split{blend}: {documents} documents, {samples} samples, "
            f"{epochs} epoch{'s' if epochs != 1 else ''}"
        )
    return lines


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


def tokens_and_labels(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of a micro-batch, on ``device``."""
    text = torch.as_tensor(batch["text"]).long().to(device, non_blocking=True)  # (mbs, seq + 1)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()
