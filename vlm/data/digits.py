"""scikit-learn's handwritten digits (1,797 real 8x8 scans) as images: the real data that ships inside a
package, which the demo writes out as files and checks such as the int8 export's agreement read in memory.
scikit-learn and Pillow are imported when called."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["digit_images", "render_digit"]


def render_digit(pixels: np.ndarray, size: int = 32) -> np.ndarray:
    """An 8x8 array of ink levels 0..16 -> a (size, size, 3) RGB uint8 image, dark ink on white."""
    from PIL import Image

    gray = (255 - pixels.astype(np.float32) * (255 / 16)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray, mode="L").resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"))


def digit_images(n: int | None = None, size: int = 32) -> tuple[list[Any], np.ndarray]:
    """The first `n` digits (all when None) as PIL RGB images rendered by `render_digit`, and their labels 0..9."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = digits.images if n is None else digits.images[:n]
    return [Image.fromarray(render_digit(scan, size)) for scan in scans], digits.target[: len(scans)].astype(np.int64)
