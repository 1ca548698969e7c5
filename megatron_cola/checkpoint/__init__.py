"""The on-disk checkpoint format, shared by training, conversion and tools (below ``training/`` and
``convert/``; it imports neither).

Layout of a checkpoint root (``--save DIR``; Megatron's tags, DeepSpeed's files)::

    DIR/latest                           tag of the newest complete checkpoint (written last, atomically)
    DIR/latest_checkpointed_iteration.txt  its iteration (Megatron's marker)
    DIR/ds_config.json                   the DeepSpeed config of the run
    DIR/.lock                            host and pid of the run saving here (``lock``)
    DIR/iter_0000100/                    one checkpoint (``iteration_tag``)
        mp_rank_XX_model_states.pt, *_optim_states.pt   DeepSpeed's engine/optimizer state + client state
        model_tpNN.pt                    model weights per TP rank, gathered whatever the ZeRO stage
        optim_tpNN.pt                    fp32 masters + Adam moments per parameter and TP rank, layout-free
        rng_state_RRRRR.pt               RNG states per global rank
        manifest.json                    size + xxh3-128 of every file, written before ``latest``

Modules: ``layout`` (names, tags, markers), ``io`` (``CheckpointWriter``/``CheckpointReader``: every
file of a checkpoint is written and read through them), ``model_files`` (the ZeRO-independent weight
files), ``deepspeed_state`` (DeepSpeed engine state and RNG), ``manifest`` (checksums), ``recovery`` (which
checkpoint to resume from, fallbacks, moving corrupt ones aside, rotation), ``weights`` (weights-only
loading into any TP layout, through the model's sharding plan in ``megatron_cola.model.sharding``),
``async_save`` (the background writer of ``--async-save``), ``lock`` (one run per save directory),
``optim_state`` (the layout-free optimizer state a resume on another layout is rebuilt from).
"""

from megatron_cola.checkpoint.io import CheckpointReader, CheckpointWriter
from megatron_cola.checkpoint.layout import (
    LATEST_FILE,
    LATEST_ITERATION_FILE,
    iteration_tag,
    model_file_name,
    read_latest,
    resolve_checkpoint_dir,
)
from megatron_cola.checkpoint.model_files import (
    load_full_state_dict,
    load_model_files,
    merge_tp_shards,
    save_model_file,
    save_weights_checkpoint,
)

__all__ = [
    "LATEST_FILE",
    "LATEST_ITERATION_FILE",
    "CheckpointReader",
    "CheckpointWriter",
    "iteration_tag",
    "load_full_state_dict",
    "load_model_files",
    "merge_tp_shards",
    "model_file_name",
    "read_latest",
    "resolve_checkpoint_dir",
    "save_model_file",
    "save_weights_checkpoint",
]
