"""Per-channel scaling of a residual branch (CaiT's LayerScale)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LayerScale"]


class LayerScale(nn.Module):
    """x * gamma, with a learned `gamma` of `width` channels initialised to `init_value`."""

    def __init__(
        self,
        width: int,
        init_value: float = 1e-5,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((width,), float(init_value), device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """(..., width) -> (..., width)."""
        return x * self.gamma
