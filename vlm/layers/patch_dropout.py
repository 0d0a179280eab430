"""Patch dropout (FLIP, https://arxiv.org/abs/2212.00794): train on a random subset of each image's patches."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["drop_patches", "patches_kept"]


def patches_kept(num_patches: int, prob: float) -> int:
    """How many of `num_patches` patch tokens survive dropout `prob`: open_clip's int(N * (1 - prob)), at least 1."""
    return max(1, int(num_patches * (1 - prob)))


def drop_patches(
    x: Tensor, prob: float, num_prefix_tokens: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Tokens (B, P + N, C) -> (B, P + K, C): the P prefix (class) tokens, then K = `patches_kept(N, prob)`
    patch tokens chosen at random for each image.

    Call it after the position embeddings are added: a kept token carries its place in the grid with it,
    so the order of the kept tokens does not matter to the (non-causal) Transformer and is left unsorted,
    as open_clip leaves it. `prob` 0 returns `x` itself.
    """
    if not 0 <= prob < 1:
        raise ValueError(f"patch dropout must be in [0, 1), got {prob!r}; 0.5 to 0.75 is usual (FLIP)")
    if prob == 0:
        return x
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    B, N, C = patches.shape
    scores = torch.rand(B, N, device=x.device, generator=generator)
    keep = scores.topk(patches_kept(N, prob), dim=-1).indices  # (B, K)
    kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, C))  # (B, K, C)
    return torch.cat([prefix, kept], dim=1)  # (B, P + K, C)
