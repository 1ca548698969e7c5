"""``ColaConfig``: the Hugging Face configuration of a Megatron-CoLA model exported for ``transformers``.

This file is copied verbatim into every exported CoLA folder and loaded there as remote code
(``trust_remote_code=True``), so it imports nothing but ``transformers``. Field names follow
``LlamaConfig`` where LLaMA has the same quantity (``hidden_size``, ``intermediate_size``,
``rms_norm_eps``, ``rope_theta``, ...); the CoLA-specific ones are ``cola_rank``, ``cola_activation``,
``gate_activation`` and ``mlp_gate_act``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

COLA_ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "identity")


class ColaConfig(PretrainedConfig):
    """Shapes and options of a CoLA LLaMA decoder.

    Every linear map of a block (q, k, v, o, gate, up, down) is ``B σ(A x)`` with ``A: in -> cola_rank``,
    ``σ = cola_activation`` and ``B: cola_rank -> out``, no bias. ``cola_rank=None`` makes them dense
    ``nn.Linear`` maps instead (a plain LLaMA in this same code, used for like-for-like benchmarks;
    exports of full-rank checkpoints are native ``LlamaForCausalLM`` folders). The MLP is
    ``down(act(gate(x)) * up(x))`` with ``act = mlp_gate_act`` (SiLU unless set) when ``gate_activation``
    and identity otherwise (the paper's 350M and larger CoLA models drop SwiGLU's own SiLU). Embeddings
    are untied.
    """

    model_type = "megatron_cola"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1376,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        cola_rank: int | None = 128,
        cola_activation: str = "silu",
        gate_activation: bool = True,
        mlp_gate_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 256,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must divide hidden_size ({hidden_size})"
            )
        for field, act in (("cola_activation", cola_activation), ("mlp_gate_act", mlp_gate_act)):
            if act not in COLA_ACTIVATIONS:
                raise ValueError(f"{field} {act!r} is unknown; allowed: {list(COLA_ACTIVATIONS)}")
        if cola_rank is not None and not 0 < cola_rank < min(hidden_size, intermediate_size):
            raise ValueError(
                f"cola_rank must satisfy 0 < cola_rank < min(hidden_size, intermediate_size) = "
                f"{min(hidden_size, intermediate_size)}, got {cola_rank}"
            )
        if tie_word_embeddings:
            raise ValueError("CoLA models have untied embeddings: tie_word_embeddings must be False")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # No grouped-query attention: every head has its own key and value (caches read this field).
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.cola_rank = cola_rank
        self.cola_activation = cola_activation
        self.gate_activation = bool(gate_activation)
        self.mlp_gate_act = mlp_gate_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.pop("num_key_value_heads", None)
        kwargs.pop("head_dim", None)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=False,
            **kwargs,
        )


__all__ = ["ColaConfig", "COLA_ACTIVATIONS"]
