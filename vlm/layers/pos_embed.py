"""Learned position embeddings resampled to another patch grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["resample_pos_embed"]


def resample_pos_embed(
    pos_embed: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1, mode: str = "bicubic"
) -> Tensor:
    """(P + N, C) -> (P + rows * cols, C): interpolation of the square patch grid, the P prefix (class)
    tokens unchanged.

    `mode` "bicubic" is transformers' `interpolate_pos_encoding` (CLIP, SigLIP) and timm's resampling;
    "bilinear_antialias" is transformers' SigLIP 2 NaFlex resizing.
    """
    prefix, patches = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    old = math.isqrt(patches.shape[0])
    assert old * old == patches.shape[0], "position embeddings cover a square grid"
    if (old, old) == tuple(grid):
        return pos_embed
    C = patches.shape[-1]
    patches = patches.reshape(1, old, old, C).permute(0, 3, 1, 2)  # (1, C, old, old)
    resample = dict(mode="bilinear", antialias=True) if mode == "bilinear_antialias" else dict(mode="bicubic")
    patches = F.interpolate(patches.float(), size=grid, align_corners=False, **resample).to(pos_embed.dtype)
    patches = patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], C)  # (rows * cols, C)
    return torch.cat([prefix, patches], dim=0)
