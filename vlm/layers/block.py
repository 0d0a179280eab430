"""The pre-norm Transformer block both towers are made of."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import Attention
from .mlp import Mlp

__all__ = ["Block"]


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)).

    Variants come in as layers: pass another `attn_layer`, `mlp_layer` or `norm_layer` (each is
    called with the same arguments as the defaults).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-5),
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(width, **dd)
        self.attn = attn_layer(width, num_heads, **dd)
        self.norm2 = norm_layer(width, **dd)
        self.mlp = mlp_layer(width, int(width * mlp_ratio), act_layer=act_layer, **dd)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """(B, N, C) -> (B, N, C); `attn_mask` and `is_causal` go to the attention unchanged."""
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))

    def forward_with_weights(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Like `forward`, also returning this block's attention probabilities (B, H, N, N)."""
        h, weights = self.attn.forward_with_weights(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + h
        return x + self.mlp(self.norm2(x)), weights
