"""``CoLALinear``: the low-rank-activation replacement of a linear map, ``y = B σ(A x)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_cola.config import ACTIVATIONS
from megatron_cola.model.recompute import rank_projection

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
    The output of A (the pre-activation on the rank-r bottleneck) is what CoLA-M keeps for backward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: str = "silu",
        bias: bool = False,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = rank_projection(x, self.weight_a)  # (..., rank): kept by CoLA-M
        return F.linear(self.act_fn(a), self.weight_b, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"activation={self.activation}, bias={self.bias is not None}"
        )


__all__ = ["CoLALinear", "cola_init_std", "get_activation"]
