"""Attention pooling with a learned probe: SigLIP's multi-head attention pooling (MAP) head."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .attention import Attention
from .mlp import Mlp

__all__ = ["AttentionPool"]


class AttentionPool(nn.Module):
    """(B, N, C) tokens -> (B, C): a learned probe attends over the tokens, then a residual MLP,
    y = attn(probe, x); y + mlp(norm(y)). timm's `AttentionPoolLatent` and transformers'
    `SiglipMultiheadAttentionPoolingHead` compute the same."""

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.probe = nn.Parameter(torch.zeros(1, width, **dd))  # (1, C): one query
        self.attn = Attention(width, num_heads, **dd)
        self.norm = norm_layer(width, **dd)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=act_layer, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens (B, N, C) -> one vector per image (B, C)."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, C)
        y = self.attn.attend(probe, x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]
