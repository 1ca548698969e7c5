"""CoLA and full-rank LLaMA models in plain PyTorch."""

from megatron_cola.model.cola_linear import CoLALinear, cola_init_std, get_activation
from megatron_cola.model.flops import training_flops_per_token
from megatron_cola.model.layers import RMSNorm
from megatron_cola.model.transformer import CoLALlama, DecoderLayer, build_model, make_linear, param_seed

__all__ = [
    "CoLALinear",
    "CoLALlama",
    "DecoderLayer",
    "RMSNorm",
    "build_model",
    "cola_init_std",
    "get_activation",
    "make_linear",
    "param_seed",
    "training_flops_per_token",
]
