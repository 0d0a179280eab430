"""Image preprocessing: a PIL image becomes the normalised tensor a model's image tower expects.

The evaluation transform reproduces open_clip's `image_transform(..., is_train=False)` bit for bit on RGB
images: resize (shortest side to `image_size`, then a centre crop, or "squash" straight to a square),
to a [0, 1] tensor, normalise. It is built from the same torchvision functions in the same order, so
embeddings computed here match embeddings computed with open_clip's preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from .config import INTERPOLATIONS, RESIZE_MODES, CLIPConfig, VisionConfig, _choice, _positive_int
from .images import to_rgb

__all__ = ["ImageTransform", "image_transform"]

_INTERPOLATION_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (3, image_size, image_size) float tensor, normalised with `mean` and `std`.

    A frozen dataclass of plain values, so it pickles into DataLoader workers and prints what it does.
    Build it with `image_transform(config)`. Images that are not RGB go through `vlm.images.to_rgb`
    first (alpha over white, 16-bit scaled), where open_clip would call `convert("RGB")` after resizing;
    RGB images, what `vlm.images.load_image` returns, give exactly open_clip's tensor.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    train: bool = False
    # open_clip's AugmentationCfg default: crops keep 90-100% of the image area.
    scale: tuple[float, float] = (0.9, 1.0)
    # torchvision's RandomResizedCrop default aspect-ratio range, which open_clip keeps.
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        _positive_int("ImageTransform", "image_size", self.image_size)
        _choice("ImageTransform", "interpolation", self.interpolation, INTERPOLATIONS)
        _choice("ImageTransform", "resize_mode", self.resize_mode, RESIZE_MODES)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"ImageTransform takes a PIL image, got {type(image).__name__}; "
                "load paths, bytes and arrays with vlm.images.load_image first"
            )
        image = to_rgb(image)
        image = self._random_crop(image) if self.train else self._resize_crop(image)
        return F.normalize(F.to_tensor(image), self.mean, self.std)  # (3, image_size, image_size)

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        mode = _INTERPOLATION_MODES[self.interpolation]
        if self.resize_mode == "squash":
            return F.resize(image, [self.image_size, self.image_size], mode)
        image = F.resize(image, [self.image_size], mode)  # one number: the shorter side
        return F.center_crop(image, [self.image_size, self.image_size])

    def _random_crop(self, image: Image.Image) -> Image.Image:
        # torchvision's RandomResizedCrop, unrolled so the object stays a plain picklable dataclass; it draws
        # from torch's generator exactly as the class does, so a seed reproduces open_clip's crops.
        top, left, height, width = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        size = [self.image_size, self.image_size]
        return F.resized_crop(image, top, left, height, width, size, _INTERPOLATION_MODES[self.interpolation])


def image_transform(config: VisionConfig | CLIPConfig | Any, *, train: bool = False) -> ImageTransform:
    """The preprocessing a model with this `config` expects.

    Args:
        config: a VisionConfig, a CLIPConfig (its `.vision` is used) or a model with a `.config`.
        train: False gives open_clip's evaluation transform (deterministic). True gives open_clip's default
            training transform: a random crop of 90-100% of the area with aspect ratio in [3/4, 4/3],
            resized to `image_size`. open_clip always resizes training crops with bicubic; this uses
            the config's `interpolation`, which is the same for the default "bicubic".
    """
    vision = _vision_config(config)
    return ImageTransform(
        image_size=vision.image_size,
        mean=vision.image_mean,
        std=vision.image_std,
        interpolation=vision.interpolation,
        resize_mode=vision.resize_mode,
        train=train,
    )


def _vision_config(config: Any) -> VisionConfig:
    if isinstance(config, VisionConfig):
        return config
    if isinstance(config, CLIPConfig):
        return config.vision
    inner = getattr(config, "config", None)
    if isinstance(inner, (VisionConfig, CLIPConfig)):
        return _vision_config(inner)
    raise TypeError(
        f"image_transform needs a VisionConfig, a CLIPConfig or a model with a .config, got {type(config).__name__}"
    )
