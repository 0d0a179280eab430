"""Images to patch tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """A stride-`patch_size` convolution: (B, 3, H, W) -> (B, H/p * W/p, C), patches in row-major order."""

    def __init__(
        self,
        patch_size: int,
        width: int,
        in_chans: int = 3,
        *,
        bias: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        # CLIP's patch embedding has no bias (the position embedding plays that role); timm's and SigLIP's have one.
        self.proj = nn.Conv2d(in_chans, width, patch_size, stride=patch_size, bias=bias, device=device, dtype=dtype)

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The (rows, columns) of patches an image batch produces."""
        if images.ndim != 4 or images.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.proj.in_channels}, H, W), got {tuple(images.shape)}; "
                "batch single images with .unsqueeze(0)"
            )
        H, W = images.shape[-2:]
        if H < self.patch_size or W < self.patch_size:
            raise ValueError(f"image of {H}x{W} pixels is smaller than one {self.patch_size}-pixel patch")
        return H // self.patch_size, W // self.patch_size

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> patch tokens (B, N, C), N = (H // p) * (W // p).

        Pixels beyond the last whole patch are dropped; ValueError for a non-4D batch or an image smaller
        than one patch.
        """
        self.grid(images)
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, C)
