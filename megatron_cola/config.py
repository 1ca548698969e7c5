"""Model configuration: ``ModelArgs`` and the table of named sizes from the CoLA paper.

``ModelArgs.from_size("1B")`` gives the paper's CoLA-1B; ``from_size("1B", full_rank=True)`` the LLaMA
baseline with the same shapes. Every field is validated once, in ``validate()``, with messages that name
the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "identity")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The ``torch.compile`` modes of ``--compile-mode`` (``model/compile.py``)."""
RECOMPUTE_CHOICES = ("none", "full", "cola-m")
#: Tensor-parallel schemes of CoLA models (``--cola-tp-scheme``; docs/tensor_parallel.md). Full-rank
#: models always use Megatron's dense TP.
TP_SCHEMES = ("split-rank", "bottleneck")
#: The one place the default scheme is set.
DEFAULT_TP_SCHEME = "split-rank"
"""The activation-recomputation modes (``ModelArgs.recompute``, ``--recompute``); the one list of them."""
EXECUTION_FIELDS = ("recompute", "grouped_projections", "chunked_loss")
"""``ModelArgs`` fields that change how the model runs, not what it computes: a checkpoint saved with
one value resumes with another (and checkpoints from before a field existed resume too)."""


@dataclass(frozen=True)
class _Size:
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_layers: int
    cola_rank: int
    gate_activation: bool  # whether CoLA keeps SwiGLU's own SiLU on the gate (60M/130M do, larger drop it)


# The paper's sizes (docs/model.md). ``debug`` is ours: tiny, for tests and the CPU quickstart.
SIZES: dict[str, _Size] = {
    "debug": _Size(256, 688, 4, 4, 64, True),
    "60M": _Size(512, 1376, 8, 8, 128, True),
    "130M": _Size(768, 2048, 12, 12, 256, True),
    "350M": _Size(1024, 2736, 16, 24, 256, False),
    "1B": _Size(2048, 5461, 32, 24, 512, False),
    "7B": _Size(4096, 11008, 32, 32, 1024, False),
}


@dataclass
class ModelArgs:
    """Shapes and options of a CoLA (or full-rank LLaMA) model."""

    hidden_size: int = 256
    """Width d of the residual stream."""
    ffn_hidden_size: int = 688
    """Inner width of the SwiGLU MLP."""
    num_attention_heads: int = 4
    """Attention heads; must divide ``hidden_size``."""
    num_layers: int = 4
    """Transformer blocks."""
    cola_rank: int = 64
    """Rank r of every CoLA bottleneck ``B σ(A x)``; ignored when ``full_rank``."""
    vocab_size: int = 32000
    """Rows of the (untied) embedding and LM head; the training script pads the tokenizer's vocab to it."""
    full_rank: bool = False
    """Use plain ``nn.Linear`` maps (the LLaMA baseline) instead of CoLA bottlenecks."""
    cola_activation: str = "silu"
    """σ applied on the rank-r bottleneck."""
    gate_activation: bool = True
    """Apply an activation to SwiGLU's gate (``down(act(gate) * up)``); False gives ``down(gate * up)``."""
    mlp_gate_act: str = "silu"
    """The gate activation ``act`` when ``gate_activation`` is on: SwiGLU's SiLU, or e.g. ``gelu`` for
    checkpoints whose ``hidden_act`` is GELU. Model files written before this field existed mean SiLU."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_seq_length: int = 256
    """Longest sequence the model is trained or evaluated on (recorded in exports)."""
    init_std: float = 0.02
    """Std of the embedding, LM head (and, in full rank, every linear weight)."""
    recompute: str = "none"
    """Activation recomputation: ``none``, ``full`` (whole block) or ``cola-m`` (keep rank-r activations)."""
    grouped_projections: bool = False
    """Run the maps that read the same input as one GEMM: q/k/v and gate/up (CoLA: their A's; full rank:
    fused qkv and gate-up). Parameters and their names are unchanged; results are bitwise equal in fp32.
    A speed option only (see docs/performance.md)."""
    chunked_loss: bool = False
    """Compute the LM head and the loss together, a chunk of tokens at a time, without full-vocab logits
    (``model/fused_loss.py``); single-rank only (tensor parallelism keeps its vocab-parallel loss)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_size(cls, name: str, full_rank: bool = False, **overrides: Any) -> ModelArgs:
        """The named size (``debug``, ``60M``, ``130M``, ``350M``, ``1B``, ``7B``), optionally full rank.

        Keyword overrides replace single fields, e.g. ``from_size("1B", cola_rank=256, vocab_size=50304)``.
        """
        key = lookup_size(name)
        size = SIZES[key]
        fields = dict(
            hidden_size=size.hidden_size,
            ffn_hidden_size=size.ffn_hidden_size,
            num_attention_heads=size.num_attention_heads,
            num_layers=size.num_layers,
            cola_rank=size.cola_rank,
            full_rank=full_rank,
            # The LLaMA baseline always keeps SwiGLU's SiLU; CoLA keeps it only at 60M/130M (and debug).
            gate_activation=True if full_rank else size.gate_activation,
        )
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ModelArgs field(s) {sorted(unknown)}; allowed: {cls.field_names()}")
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """Each field's default: the meaning of a field that an older saved ``args`` dict lacks."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    def replace(self, **changes: Any) -> ModelArgs:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        known = set(cls.field_names())
        return cls(**{k: v for k, v in d.items() if k in known})

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each of the seven linear maps of a block."""
        d, f = self.hidden_size, self.ffn_hidden_size
        return {
            "q_proj": (d, d),
            "k_proj": (d, d),
            "v_proj": (d, d),
            "o_proj": (d, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    def num_params(self) -> int:
        """Analytic parameter count (equals ``sum(p.numel())`` of the built model)."""
        per_layer = 2 * self.hidden_size  # two RMSNorm weights
        for d_in, d_out in self.linear_shapes().values():
            per_layer += d_in * d_out if self.full_rank else self.cola_rank * (d_in + d_out)
        embed_and_head = 2 * self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + embed_and_head + self.hidden_size

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what it may be."""
        for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelArgs.num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size}); choose a divisor of {self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head dim hidden_size/num_attention_heads = {self.head_dim} must be even (RoPE)"
            )
        if not self.full_rank:
            smallest = min(min(s) for s in self.linear_shapes().values())
            if not isinstance(self.cola_rank, int) or not 0 < self.cola_rank < smallest:
                raise ValueError(
                    f"ModelArgs.cola_rank must satisfy 0 < cola_rank < min(d_in, d_out) = {smallest}, "
                    f"got {self.cola_rank!r}"
                )
        for name in ("cola_activation", "mlp_gate_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(
                    f"ModelArgs.{name} {getattr(self, name)!r} is unknown; allowed: {list(ACTIVATIONS)}"
                )
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(
                f"ModelArgs.recompute {self.recompute!r} is unknown; allowed: {list(RECOMPUTE_CHOICES)}"
            )
        if self.recompute == "cola-m" and self.full_rank:
            raise ValueError(
                "ModelArgs.recompute='cola-m' needs a CoLA model (it keeps the rank-r activations); "
                "for a full-rank model use recompute='full' or 'none'"
            )
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ValueError("ModelArgs.norm_eps, rope_theta and init_std must be positive")
        if self.max_seq_length <= 0:
            raise ValueError(f"ModelArgs.max_seq_length must be positive, got {self.max_seq_length}")


def lookup_size(name: str) -> str:
    """The ``SIZES`` key of ``name`` (case-insensitive); ``ValueError`` naming the allowed sizes."""
    for key in SIZES:
        if key.lower() == str(name).lower():
            return key
    raise ValueError(f"unknown model size {name!r}; allowed: {list(SIZES)}")
