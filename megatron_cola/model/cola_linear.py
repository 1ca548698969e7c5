"""``CoLALinear``: the low-rank-activation replacement of a linear map, ``y = B σ(A x)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cola.config import ACTIVATIONS
from megatron_cola.model.recompute import grouped_linear, rank_projection

_ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise function called ``name`` (one of ``config.ACTIVATIONS``)."""
    if name not in _ACTIVATION_FNS:
        raise ValueError(f"unknown activation {name!r}; allowed: {list(ACTIVATIONS)}")
    return _ACTIVATION_FNS[name]


def cola_init_std(in_features: int, out_features: int, rank: int) -> float:
    """Std of A and B entries so that ``B @ A`` has entry variance ``1 / (d_in + d_out)``."""
    return rank ** (-0.25) * (in_features + out_features) ** (-0.25)


class CoLALinear(nn.Module):
    """``y = B σ(A x)`` with ``A: in → rank`` and ``B: rank → out``.

    Parameters (``nn.Linear`` layout, ``(out, in)``):
      - ``weight_a``: ``(rank, in_features)``, the down projection A onto the bottleneck;
      - ``weight_b``: ``(out_features, rank)``, the up projection B out of it;
      - ``bias``: ``(out_features,)`` when ``bias=True`` (CoLA models use none).
    The output of A (the pre-activation on the rank-r bottleneck) is what CoLA-M keeps for backward
    (``keep_a_output``). ``forward`` is ``from_rank(rank_projection(x, [weight_a]))``; a grouped caller
    runs several layers' A's as one GEMM and hands each its slice (``project_shared_input`` below).
    Standalone, the constructor draws the weights; inside ``CoLALlama`` it is built on the meta device
    and ``init_weights`` draws them once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: str = "silu",
        bias: bool = False,
        keep_a_output: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 < rank < min(in_features, out_features):
            raise ValueError(
                f"CoLALinear rank must satisfy 0 < rank < min(in_features, out_features) = "
                f"{min(in_features, out_features)}, got {rank}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.activation = activation
        self.act_fn = get_activation(activation)
        self.keep_a_output = keep_a_output  # CoLA-M: the A output is kept, not recomputed
        factory = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.weight_a.device.type != "meta":
            self.reset_parameters()

    @property
    def init_std(self) -> float:
        return cola_init_std(self.in_features, self.out_features, self.rank)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = self.init_std
        with torch.no_grad():
            self.weight_a.normal_(0.0, std, generator=generator)
            self.weight_b.normal_(0.0, std, generator=generator)
            if self.bias is not None:
                self.bias.zero_()

    def from_rank(self, a: torch.Tensor) -> torch.Tensor:
        """The rest of the map after A: ``B σ(a)`` (+ bias)."""
        return self.from_activated(self.act_fn(a))

    def from_activated(self, s: torch.Tensor) -> torch.Tensor:
        """The map after σ: ``B s`` (+ bias)."""
        return F.linear(s, self.weight_b, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = rank_projection(x, (self.weight_a,), keep=self.keep_a_output)  # (..., rank): kept by CoLA-M
        return self.from_rank(a)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"activation={self.activation}, bias={self.bias is not None}, keep_a_output={self.keep_a_output}"
        )


def project_shared_input(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]`` with the first GEMM of the layers grouped into one.

    CoLA layers (``weight_a``, ``from_activated``: ``CoLALinear`` and its column-parallel twin) run
    their A's as one GEMM over ``[A_1; A_2; ...]`` (kept as one tensor by CoLA-M) and σ as one
    elementwise op, then each its own B; dense bias-free layers (``weight``) run as one GEMM over
    ``[W_1; W_2; ...]``, and their output slices are made contiguous (a copy in eager, fused away under
    ``torch.compile``) so that the elementwise work after them sees the plain path's layout. Outputs and
    gradients equal the separate calls up to fp32 rounding (``grouped_linear``; the tests hold them to
    1e-5 relative). Under tensor parallelism each rank groups its local slices; a layer that knows a
    better grouping of its own kind (``project_shared_input`` method: the bottleneck TP scheme's, which
    also shares one all-reduce) is handed the group.
    """
    own = getattr(layers[0], "project_shared_input", None)
    if own is not None:
        return own(layers, x)
    if all(hasattr(layer, "weight_a") for layer in layers):
        keep = {layer.keep_a_output for layer in layers}
        activation = {layer.activation for layer in layers}
        if len(keep) != 1 or len(activation) != 1:
            raise ValueError("grouped CoLA layers must agree on keep_a_output and activation")
        weights = [layer.weight_a for layer in layers]
        a = rank_projection(x, weights, keep=keep.pop())  # (..., sum of local ranks)
        s = layers[0].act_fn(a)  # σ once over the group
        parts = s.split([w.shape[0] for w in weights], dim=-1)
        return [layer.from_activated(part) for layer, part in zip(layers, parts)]
    if any(getattr(layer, "bias", None) is not None or not hasattr(layer, "weight") for layer in layers):
        raise ValueError("grouped projections need CoLA layers or bias-free dense layers")
    weights = [layer.weight for layer in layers]
    out = grouped_linear(x, weights)  # (..., sum of outputs)
    return [part.contiguous() for part in out.split([w.shape[0] for w in weights], dim=-1)]


__all__ = ["CoLALinear", "cola_init_std", "get_activation", "project_shared_input"]
