"""The pre-norm Transformer block both towers are made of."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import Attention
from .layer_scale import LayerScale
from .mlp import Mlp

__all__ = ["Block"]


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); with `layer_scale`, each branch is scaled per channel
    (`ls1`, `ls2`) before it is added.

    Variants come in as layers: pass another `attn_layer`, `mlp_layer` or `norm_layer` (each is
    called with the same arguments as the defaults).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-5),
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        layer_scale: float | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = norm_layer(width, **dd)
        self.attn = attn_layer(width, num_heads, **dd)
        self.ls1 = LayerScale(width, layer_scale, **dd) if layer_scale is not None else nn.Identity()
        self.norm2 = norm_layer(width, **dd)
        self.mlp = mlp_layer(width, int(width * mlp_ratio), act_layer=act_layer, **dd)
        self.ls2 = LayerScale(width, layer_scale, **dd) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """(B, N, C) -> (B, N, C); `attn_mask` and `is_causal` go to the attention unchanged."""
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_queries(self, x: Tensor, index: Tensor, is_causal: bool = False) -> Tensor:
        """`forward` at the positions `index` (B, M) only: (B, N, C) -> (B, M, C). Every token still serves
        as key and value; with `is_causal`, the query at position p sees the keys up to p. What the other
        positions would output is never computed: the last block of a tower that reads one token per row."""
        C = x.shape[-1]
        h = self.norm1(x)
        rows = index[..., None].expand(-1, -1, C)  # (B, M, C)
        mask = None
        if is_causal:
            keys = torch.arange(x.shape[1], device=x.device)
            mask = (keys <= index[..., None])[:, None]  # (B, 1, M, N)
        y = x.gather(1, rows) + self.ls1(self.attn.attend(h.gather(1, rows), h, attn_mask=mask))
        return y + self.ls2(self.mlp(self.norm2(y)))

    def forward_with_weights(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Like `forward`, also returning this block's attention probabilities (B, H, N, N)."""
        h, weights = self.attn.forward_with_weights(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.ls1(h)
        return x + self.ls2(self.mlp(self.norm2(x))), weights
