"""Data pipeline: tokenizers, Megatron ``.bin/.idx`` indexed datasets, GPT/blended datasets, samplers.

See docs/data.md for the tools (``tools/prepare_sample_corpus.py``, ``tools/train_tokenizer.py``,
``tools/preprocess_data.py``, ``tools/merge_datasets.py``) and the on-disk formats.
"""

from megatron_cola.data.blended_dataset import BlendedDataset, blend_sizes
from megatron_cola.data.builder import build_train_valid_test_datasets, check_data_prefix, parse_data_path
from megatron_cola.data.gpt_dataset import GPTDataset, parse_split, split_ranges
from megatron_cola.data.helpers import HAVE_CPP_HELPERS, build_blending_indices, build_sample_idx
from megatron_cola.data.indexed_dataset import (
    IndexedDatasetError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_dtype,
    check_dataset_files,
    data_file_path,
    index_file_path,
)
from megatron_cola.data.samplers import PretrainingSampler
from megatron_cola.data.tokenizers import (
    AbstractTokenizer,
    HuggingFaceTokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

__all__ = [
    "HAVE_CPP_HELPERS",
    "AbstractTokenizer",
    "BlendedDataset",
    "GPTDataset",
    "HuggingFaceTokenizer",
    "IndexedDatasetError",
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "NullTokenizer",
    "PretrainingSampler",
    "SentencePieceTokenizer",
    "best_fitting_dtype",
    "blend_sizes",
    "build_blending_indices",
    "build_sample_idx",
    "build_tokenizer",
    "build_train_valid_test_datasets",
    "check_data_prefix",
    "check_dataset_files",
    "data_file_path",
    "index_file_path",
    "parse_data_path",
    "parse_split",
    "split_ranges",
]
