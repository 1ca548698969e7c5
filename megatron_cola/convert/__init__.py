"""Hugging Face export and import.

``export_checkpoint`` writes a checkpoint as a ``transformers`` folder (``LlamaForCausalLM`` for full
rank, ``ColaForCausalLM`` with its code for CoLA); ``import_hf_folder`` reads LLaMA, Megatron-CoLA
and the CoLA authors' folders back into a checkpoint. ``configuration_cola.py`` and
``modeling_cola.py`` are the ``transformers`` implementation, copied into every CoLA export.

Importing this package registers ``ColaConfig``/``ColaForCausalLM`` with ``transformers``' auto classes,
so that in a process that has Megatron-CoLA, ``AutoConfig``, ``AutoTokenizer`` and
``AutoModelForCausalLM`` open exported CoLA folders without remote code (elsewhere the folder's own
copy of the code is used, with ``trust_remote_code=True``).
"""

from megatron_cola.convert.export import build_hf_model, export_checkpoint, write_hf_folder
from megatron_cola.convert.import_hf import import_hf_folder, load_hf_folder
from megatron_cola.errors import ConversionError


def register_auto_classes() -> None:
    """Register the CoLA config and model with ``AutoConfig``/``AutoModelForCausalLM`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_cola.convert.configuration_cola import ColaConfig
    from megatron_cola.convert.modeling_cola import ColaForCausalLM

    try:
        AutoConfig.register(ColaConfig.model_type, ColaConfig, exist_ok=True)
        AutoModelForCausalLM.register(ColaConfig, ColaForCausalLM, exist_ok=True)
    except TypeError:  # transformers < 4.41 has no exist_ok
        try:
            AutoConfig.register(ColaConfig.model_type, ColaConfig)
            AutoModelForCausalLM.register(ColaConfig, ColaForCausalLM)
        except ValueError:
            pass


register_auto_classes()

__all__ = [
    "ConversionError",
    "build_hf_model",
    "export_checkpoint",
    "import_hf_folder",
    "load_hf_folder",
    "register_auto_classes",
    "write_hf_folder",
]
