"""Image loading: every kind of source becomes one fully decoded 8-bit RGB PIL image.

`load_image` is the single entry point. Whatever comes in (a path, encoded bytes, a file object, a PIL
image, a numpy array or a torch tensor) leaves upright (EXIF orientation applied), in mode "RGB", with
its pixels in memory and no file left open. Anything that cannot be loaded raises `ImageLoadError`,
which names the source and the reason, so a data pipeline can catch one exception type and skip the
file.

Conventions, chosen once for every source:

- Transparency is composited over white. open_clip's `_convert_to_rgb` calls `convert("RGB")`, which
  drops alpha and exposes whatever colour the encoder left under transparent pixels (usually black,
  sometimes garbage); Hugging Face's CLIP processors (`transformers.image_transforms.convert_to_rgb`)
  composite over white, which is also how a browser shows a transparent logo on a page. White is
  deterministic and matches what a person saw when the caption was written.
- 16-bit data (modes "I;16*", PIL's "I", uint16 arrays) is scaled to 8 bits with round(v / 257), so
  65535 maps to 255 and 32768 to 128. PIL's own `convert("RGB")` clips these modes at 255 instead,
  which turns almost every 16-bit image white. Mode "I" is read as 16-bit because that is where PIL's
  decoders put 16-bit data (PGM/PPM files with maxval > 255, older Pillow's 16-bit PNGs).
- Floats (mode "F", float arrays and tensors) are in [0, 1], the torchvision convention. Values that do
  not round to an 8-bit level 0..255 are refused rather than clipped: a float image in 0..255 or a
  normalised tensor is a bug upstream, and clipping would hide it as a white or black picture.
- Multi-frame files (GIF, APNG, multi-page TIFF) give their first frame.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from typing import IO, TYPE_CHECKING, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageLoadError", "load_image", "to_rgb", "DEFAULT_MAX_PIXELS", "ImageSource"]

logger = logging.getLogger(__name__)

# PIL's own hard limit: it raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS (178,956,970
# pixels, 0.5 GiB as RGB) and only warns between 1x and 2x. Refusing at PIL's warning level would reject
# real 100-megapixel camera photos (11648 x 8736) that PIL itself opens; `draft_size` decodes those cheaply.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

if TYPE_CHECKING:
    import torch

# torch.Tensor by name: loading images needs no torch (an ONNX runtime loads them without it).
ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray, "torch.Tensor"]

_WHITE = (255, 255, 255)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ARRAY_CHANNELS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA
_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


class ImageLoadError(ValueError):
    """An image source that cannot be loaded; `.source` names it and `.reason` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Exceptions pickle through `args` (the message alone); rebuild from both fields instead, so the
        # error survives being sent back from a worker process.
        return type(self), (self.source, self.reason)


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Load `source` as an upright, fully decoded 8-bit RGB PIL image.

    Args:
        source: a file path (str or os.PathLike); encoded file content (bytes, bytearray, memoryview:
            always content, never a path); a binary file object (left open, read from position 0); a
            PIL image (a copy is returned; a lazily opened one is decoded here); a numpy array (H, W),
            (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) of uint8, uint16 (scaled by 1/257), bool
            (True is white) or float in [0, 1]; or a torch tensor (C, H, W) or (H, W) with the same
            dtypes. Two or four channels carry alpha.
        max_pixels: refuse images with more than this many pixels (width * height), checked on the file
            header before any pixel is decoded. None turns the check off. PIL's process-wide
            `Image.MAX_IMAGE_PIXELS` still applies on top of it when a file is opened.
        draft_size: (width, height) the image is going to be reduced to. JPEGs are then decoded at the
            smallest 1/2, 1/4 or 1/8 scale that stays at least this large, which is several times faster
            for big photos but not bit-identical to decoding at full size. Ignored for other formats.

    Raises:
        ImageLoadError: the source cannot be read or decoded (missing file, not an image, truncated or
            corrupt data, too many pixels, an array of the wrong shape, dtype or range).
        TypeError: `source` is of a type this function does not take.
    """
    _check_options(max_pixels, draft_size)
    if isinstance(source, Image.Image):
        return _finish(source, _describe_image(source), max_pixels, draft_size)
    torch = sys.modules.get("torch")  # a tensor exists only where torch was imported
    if torch is not None and isinstance(source, torch.Tensor):
        name = f"<tensor of shape {tuple(source.shape)} and dtype {source.dtype}>"
        return _finish(_tensor_to_pil(source, name), name, max_pixels, None)
    if isinstance(source, np.ndarray):
        name = f"<array of shape {source.shape} and dtype {source.dtype}>"
        return _finish(_array_to_pil(source, name), name, max_pixels, None)
    if isinstance(source, (str, os.PathLike)):
        return _load_file(source, os.fsdecode(source), max_pixels, draft_size)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = f"<bytes of length {memoryview(source).nbytes}>"
        return _load_file(io.BytesIO(source), name, max_pixels, draft_size)
    if isinstance(source, io.TextIOBase):
        raise TypeError(f"load_image needs a binary file object; {source!r} is a text file, open it with 'rb'")
    if hasattr(source, "read"):
        name = str(getattr(source, "name", f"<{type(source).__name__} object>"))
        return _load_file(source, name, max_pixels, draft_size)
    raise TypeError(
        f"load_image cannot load a {type(source).__name__}; pass a path, bytes, a binary file object, "
        "a PIL image, a numpy array or a torch tensor"
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in mode "RGB": alpha composited over white, 16-bit scaled to 8 bits, floats read as [0, 1].

    An RGB image without transparency is returned as is (not copied). No EXIF orientation is applied here.
    """
    if image.mode == "RGB" and not image.has_transparency_data:
        return image
    if image.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(image), _describe_image(image))).convert("RGB")
    if image.mode.startswith("I"):
        return Image.fromarray(_uint16_to_uint8(np.asarray(image))).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _check_options(max_pixels: int | None, draft_size: tuple[int, int] | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None (no limit), got {max_pixels!r}")
    if draft_size is None:
        return
    pair = isinstance(draft_size, (tuple, list)) and len(draft_size) == 2
    if not pair or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in draft_size):
        raise ValueError(f"draft_size must be a (width, height) pair of positive ints or None, got {draft_size!r}")


def _load_file(
    fp: str | os.PathLike | IO[bytes], name: str, max_pixels: int | None, draft_size: tuple[int, int] | None
) -> Image.Image:
    """Open, check and decode an encoded image; a file this function opened is closed on every path."""
    try:
        with Image.open(fp) as image:
            return _finish(image, name, max_pixels, draft_size)
    except ImageLoadError:
        raise
    except FileNotFoundError as err:
        raise ImageLoadError(name, "file not found") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(name, "not an image in any format PIL can read (empty, text, or unsupported)") from err
    except Image.DecompressionBombError as err:
        raise _pil_bomb_error(name, err, max_pixels) from err
    except (OSError, ValueError) as err:  # unreadable (a directory, no permission) or a header PIL rejects
        raise ImageLoadError(name, f"cannot read it ({err})") from err


def _finish(image: Image.Image, name: str, max_pixels: int | None, draft_size: tuple[int, int] | None) -> Image.Image:
    """Check the size, then decode, orient and convert `image`; decoding failures become ImageLoadError."""
    _check_pixels(image.size, name, max_pixels)
    try:
        if draft_size is not None:
            _draft(image, draft_size, name)
        upright = ImageOps.exif_transpose(image)  # loads the pixels; always a new image
    except Image.DecompressionBombError as err:  # GIF frames are checked again while decoding
        raise _pil_bomb_error(name, err, max_pixels) from err
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        # PIL reports truncated and corrupt data with all four; it honours ImageFile.LOAD_TRUNCATED_IMAGES.
        raise ImageLoadError(name, f"the image data is truncated or corrupt ({err})") from err
    try:
        return to_rgb(upright)
    except ImageLoadError as err:
        raise ImageLoadError(name, err.reason) from err
    except ValueError as err:
        raise ImageLoadError(name, f"PIL cannot convert mode {upright.mode!r} to RGB ({err})") from err


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            name,
            f"{width} x {height} = {width * height:,} pixels is more than max_pixels={max_pixels:,} "
            "(a guard against decompression bombs); if you trust this image, pass max_pixels=None or a larger value",
        )
    if width == 0 or height == 0:
        raise ImageLoadError(name, f"the image is empty ({width} x {height} pixels)")


def _pil_bomb_error(name: str, err: Image.DecompressionBombError, max_pixels: int | None) -> ImageLoadError:
    match = _PIL_BOMB_PIXELS.search(str(err))
    pixels = int(match.group(1)) if match else None
    if pixels is not None and max_pixels is not None and pixels > max_pixels:
        reason = f"{pixels:,} pixels is more than max_pixels={max_pixels:,} (a guard against decompression bombs)"
        return ImageLoadError(name, reason + "; if you trust this image, pass max_pixels=None or a larger value")
    return ImageLoadError(
        name,
        f"PIL refused it ({err}); its process-wide limit Image.MAX_IMAGE_PIXELS applies on top of max_pixels: "
        "if you trust this image, raise PIL.Image.MAX_IMAGE_PIXELS (or set it to None) as well",
    )


def _draft(image: Image.Image, draft_size: tuple[int, int], name: str) -> None:
    if image.format != "JPEG":
        return
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSED_ORIENTATIONS:
        draft_size = (draft_size[1], draft_size[0])  # `draft_size` is for the upright image
    before = image.size
    image.draft("RGB", draft_size)
    if image.size != before:
        logger.debug("decoding %s at %s instead of %s", name, image.size, before)


def _describe_image(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return os.fsdecode(filename) if filename else f"<PIL image of mode {image.mode}, size {image.size}>"


def _tensor_to_pil(tensor: torch.Tensor, name: str) -> Image.Image:
    if tensor.ndim == 3:
        if tensor.shape[0] not in _ARRAY_CHANNELS:
            raise ImageLoadError(
                name, "a 3-D tensor must be (C, H, W) with C in 1..4; if it is (H, W, C), pass tensor.permute(2, 0, 1)"
            )
        tensor = tensor.permute(1, 2, 0)  # (H, W, C)
    if tensor.is_floating_point():
        tensor = tensor.float()  # numpy has no bfloat16
    return _array_to_pil(tensor.detach().cpu().numpy(), name)


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in _ARRAY_CHANNELS)):
        raise ImageLoadError(name, "an array must be (H, W) or (H, W, C) with C in 1..4")
    if array.size == 0:
        raise ImageLoadError(name, "the array holds no pixels")
    # fromarray reads (H, W) uint8 as "L" and (H, W, 2 | 3 | 4) as "LA", "RGB", "RGBA".
    return Image.fromarray(np.ascontiguousarray(_array_to_uint8(array, name)))


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _uint16_to_uint8(array)
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array, name)
    raise ImageLoadError(
        name,
        f"dtype {array.dtype} is not an image dtype; use uint8, uint16, bool or float in [0, 1] "
        "(e.g. array.astype(np.uint8) if the values are 0..255)",
    )


def _uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    """round(v / 257) in integer arithmetic, after clipping to the 16-bit range (mode "I" is 32-bit)."""
    wide = np.clip(array, 0, 65535).astype(np.int32)
    return ((2 * wide + 257) // 514).astype(np.uint8)


def _float_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if np.isnan(array).any():
        raise ImageLoadError(name, "float pixels include NaN; replace them (np.nan_to_num) before loading")
    levels = np.rint(array.astype(np.float32) * 255)
    if levels.min() < 0 or levels.max() > 255:
        raise ImageLoadError(
            name,
            f"float pixels must be in [0, 1] but range over [{array.min():g}, {array.max():g}]; "
            "divide by 255 if they are in 0..255, or clip them to [0, 1]",
        )
    return levels.astype(np.uint8)
