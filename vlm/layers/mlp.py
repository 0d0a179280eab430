"""The Transformer's position-wise MLP and the activations CLIP checkpoints use."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["Mlp", "QuickGELU", "get_act_layer"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        """Elementwise; any shape in, the same shape out."""
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    # GELU's tanh approximation: big_vision's (flax) default, which SigLIP 2's towers were trained with.
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
}


def get_act_layer(name: str) -> Callable[[], nn.Module]:
    """The activation class for a config's `activation` name; ValueError naming the choices otherwise."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}") from None


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, as in timm and open_clip (`c_fc`/`c_proj` there)."""

    def __init__(
        self,
        width: int,
        hidden_width: int,
        *,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden_width, device=device, dtype=dtype)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_width, width, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(..., width) -> (..., width), through `hidden_width` channels."""
        return self.fc2(self.act(self.fc1(x)))
