"""Changes to training images and their labels: the random affine augmentation, mixup and cutmix, and
the fixed shifted copy on which robustness is measured.

Every random draw comes from (seed, step), never from a running generator: the same image gets the
same change whatever the number of processes, and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .finetune_config import AugmentConfig

__all__ = ["augment_params", "augment_images", "shift_images", "Partners", "mixed_loss", "cutmix"]


def shift_images(images: Tensor, *, seed: int = 0) -> Tensor:
    """The shifted copy: a quarter of the images each rotated (±20°), blurred, noised, or rescaled (shrunk
    to 60% and padded back), deterministically by `seed`. Works on normalised tensors (B, 3, H, W)."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    kind = torch.arange(len(images)) % 4
    H, W = images.shape[-2:]
    for i in range(len(images)):
        x = images[i]
        fill = [float(v) for v in x[:, 0, 0]]  # the corner colour: the background
        if kind[i] == 0:
            angle = float(torch.empty(1).uniform_(15, 25, generator=g)) * (1 if i % 8 < 4 else -1)
            out[i] = TF.rotate(x, angle, fill=fill)
        elif kind[i] == 1:
            out[i] = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.2, 1.2])
        elif kind[i] == 2:
            out[i] = x + 0.5 * torch.randn(x.shape, generator=g)
        else:
            h, w = max(1, int(H * 0.6)), max(1, int(W * 0.6))
            small = TF.resize(x, [h, w], antialias=True)
            top, left = (H - h) // 2, (W - w) // 2
            out[i] = torch.tensor(fill).view(3, 1, 1).expand(3, H, W).clone()
            out[i, :, top : top + h, left : left + w] = small
    return out


@dataclass(frozen=True)
class Partners:
    """The images (built only when mixing needs them) and labels each image of a batch is mixed with."""

    images: Callable[[], Tensor]
    labels: Tensor


def augment_params(n: int, *, seed: int, step: int) -> Tensor:
    """Random affine parameters for `n` images, (n, 4): rotation in degrees (±10), scale (0.9-1.1), and
    horizontal and vertical shift as fractions of the side (±0.08); deterministic in (seed, step)."""
    rng = np.random.default_rng((seed, step, 1))
    return torch.tensor(
        np.stack(
            [rng.uniform(-10, 10, n), rng.uniform(0.9, 1.1, n), rng.uniform(-0.08, 0.08, n), rng.uniform(-0.08, 0.08, n)],
            axis=1,
        ),
        dtype=torch.float32,
    )


def augment_images(images: Tensor, params: Tensor) -> Tensor:
    """Applies `augment_params` rows (n, 4) to normalised images (n, 3, H, W), bilinearly. Pixels that
    come from outside the image repeat its edge (the background, for digits and most photos)."""
    H, W = images.shape[-2:]
    angle, scale, dx, dy = (torch.as_tensor(c, dtype=images.dtype) for c in params.T)
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # The inverse map, output -> input pixel, in grid_sample's [-1, 1] coordinates (scaled per axis so
    # that a rotation stays a rotation on non-square images).
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin * H / W
    theta[:, 1, 0], theta[:, 1, 1] = -sin * W / H, cos
    shift = torch.stack([2 * dx, 2 * dy], dim=1)
    theta[:, :, 2] = -(theta[:, :, :2] @ shift.unsqueeze(-1)).squeeze(-1)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mixed_loss(
    classifier: nn.Module,
    images: Tensor,
    labels: Tensor,
    partners: Partners,
    augment: AugmentConfig,
    *,
    label_smoothing: float,
    seed: int,
    step: int,
) -> Tensor:
    """The summed cross-entropy (with `label_smoothing`) of the batch, on images mixed with their
    `partners` (mixup or cutmix) when `augment` turns those on."""
    ce = partial(F.cross_entropy, label_smoothing=label_smoothing, reduction="sum")
    use_mixup, use_cutmix = augment.mixup_alpha > 0, augment.cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return ce(classifier(images), labels)
    rng = np.random.default_rng((seed, step))
    use_box = use_cutmix and (not use_mixup or rng.random() < 0.5)  # both on: one or the other, as timm does
    lam = float(rng.beta(*(2 * [augment.cutmix_alpha if use_box else augment.mixup_alpha])))
    other = partners.images()
    if use_box:
        images, lam = cutmix(images, other, lam, rng)
    else:
        images = lam * images + (1 - lam) * other
    logits = classifier(images)
    return lam * ce(logits, labels) + (1 - lam) * ce(logits, partners.labels)


def cutmix(images: Tensor, other: Tensor, lam: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """Pastes a box of (1 - lam) of the area from `other` into `images` (Yun et al. 2019); returns the
    mixed images and lam corrected to the box's real area after clipping at the border."""
    H, W = images.shape[-2:]
    cut = math.sqrt(1 - lam)
    h, w = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, H)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, W)
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (H * W)

