"""load_image: every source kind, every PIL mode, EXIF orientation, and every way a file can be bad.

All fixtures are generated here with PIL and numpy; nothing is downloaded.
"""

from __future__ import annotations

import builtins
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlm.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, to_rgb

RED, GREY, WHITE = (255, 0, 0), (128, 128, 128), (255, 255, 255)


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    """A smooth RGB image: JPEG keeps it close to the original, so pixels can be compared with a tolerance."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def _marked(width: int = 64, height: int = 32) -> Image.Image:
    """Grey with a red block in the top-left corner: shows which way an image was turned.

    Sizes are multiples of 16 so the block edges fall on JPEG block edges and survive compression.
    """
    image = Image.new("RGB", (width, height), GREY)
    image.paste(RED, (0, 0, 16, 16))
    return image


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _blank_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of black pixels: any size compresses to a few kB, the shape of a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = bytes(1 + (width + 7) // 8) * 1000  # 1000 rows: a filter byte, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(rows) for _ in range(height // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _close(a: Image.Image, b: Image.Image, tol: int) -> bool:
    return a.size == b.size and int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) <= tol


# ---- bad files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused_naming_it(tmp_path, fmt):
    whole = io.BytesIO()
    _gradient(300, 200).save(whole, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert info.value.source == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a picture\n"], ids=["empty", "text"])
def test_non_image_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="not an image") as info:
        load_image(path)
    assert info.value.source == str(path)


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found") as info:
        load_image(tmp_path / "nope.png")
    assert info.value.source == str(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="cannot read"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_blank_png(20_000, 20_000))
    assert path.stat().st_size < 100_000
    limit_before = Image.MAX_IMAGE_PIXELS

    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageLoadError, match="400,000,000 pixels") as info:
        load_image(path)
    assert info.value.source == str(path) and "max_pixels=None" in str(info.value)
    # Our limit cannot lift PIL's process-wide one; the message says which global to change.
    with pytest.raises(ImageLoadError, match="MAX_IMAGE_PIXELS"):
        load_image(path, max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_is_checked_before_decoding_and_can_be_raised(tmp_path, monkeypatch):
    path = _save(_gradient(100, 50), tmp_path / "small.png")
    assert DEFAULT_MAX_PIXELS >= Image.MAX_IMAGE_PIXELS
    assert load_image(path, max_pixels=5000).size == (100, 50)
    assert load_image(path, max_pixels=None).size == (100, 50)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the size check"))
    with pytest.raises(ImageLoadError, match="100 x 50 = 5,000 pixels is more than max_pixels=4,999"):
        load_image(path, max_pixels=4999)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_max_pixels_is_a_value_error(tmp_path, bad):
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(_gradient(), max_pixels=bad)


def test_no_file_is_left_open(tmp_path, monkeypatch):
    whole = _save(_gradient(), tmp_path / "ok.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[:300])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_blank_png(20_000, 20_000))
    opened = []
    real_open = builtins.open

    def recording_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(builtins, "open", recording_open)
    for path in (whole, cut, text, bomb):
        try:
            load_image(path)
        except ImageLoadError:
            pass
    monkeypatch.undo()
    assert len(opened) >= 4 and all(f.closed for f in opened)


def test_error_pickles_with_its_fields():
    err = pickle.loads(pickle.dumps(ImageLoadError("a.jpg", "file not found")))
    assert isinstance(err, ValueError)
    assert (err.source, err.reason, str(err)) == ("a.jpg", "file not found", "cannot load image a.jpg: file not found")


def test_a_lazily_opened_truncated_image_is_refused(tmp_path):
    whole = io.BytesIO()
    _gradient(300, 200).save(whole, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole.getvalue()[:2000])
    with Image.open(path) as lazy, pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(lazy)
    assert info.value.source == str(path)


# ---- EXIF orientation ----------------------------------------------------------------------------------


def test_exif_orientation_6_is_turned_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display after a quarter turn clockwise
    path = _save(_marked(64, 32), tmp_path / "sideways.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (32, 64)
    assert _close_pixel(image.getpixel((27, 5)), RED)  # the stored top-left is now top-right
    assert _close_pixel(image.getpixel((5, 5)), GREY)


# How each EXIF orientation stores an upright image (the inverse of what a viewer does to display it).
_STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(_STORED_AS))
def test_every_exif_orientation_round_trips(tmp_path, orientation):
    upright = _marked(64, 32)
    method = _STORED_AS[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(stored, tmp_path / f"o{orientation}.jpg", exif=exif, quality=95, subsampling=0)
    assert _close(load_image(path), upright, tol=40)
    assert _close(load_image(path.read_bytes()), upright, tol=40)


def _close_pixel(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


# ---- modes ---------------------------------------------------------------------------------------------


def test_palette_transparency_is_composited_over_white(tmp_path):
    image = Image.new("P", (4, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putdata([0, 1, 1, 0])
    path = _save(image, tmp_path / "p.png", transparency=0)
    loaded = load_image(path)
    assert [loaded.getpixel((x, 0)) for x in range(4)] == [WHITE, RED, RED, WHITE]
    with Image.open(path) as raw:
        assert raw.convert("RGB").getpixel((0, 0)) == (0, 0, 0)  # what open_clip's convert("RGB") sees


def test_la_and_rgba_alpha_is_composited_over_white(tmp_path):
    la = Image.fromarray(np.array([[[100, 255], [100, 0], [100, 128]]], np.uint8))  # (1, 3, 2): "LA"
    assert la.mode == "LA"
    assert [load_image(la).getpixel((x, 0)) for x in range(3)] == [(100,) * 3, WHITE, (177,) * 3]
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    loaded = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert [loaded.getpixel((x, 0)) for x in range(2)] == [WHITE, (0, 0, 255)]


def test_cmyk_converts_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    assert load_image(cmyk).getpixel((0, 0)) == RED
    assert _close_pixel(load_image(_save(cmyk, tmp_path / "cmyk.jpg")).getpixel((8, 8)), RED)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / f"grey16.{fmt.lower()}")
    loaded = load_image(path)
    assert [loaded.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
        assert raw.convert("RGB").getpixel((1, 0)) == WHITE  # PIL's own convert clips


def test_16_bit_big_endian_and_mode_i(tmp_path):
    big_endian = Image.fromarray(np.array([[32768, 65535]], ">u2"))
    assert big_endian.mode == "I;16B"
    assert load_image(big_endian).getpixel((0, 0)) == (128,) * 3
    pgm = tmp_path / "grey16.pgm"  # PIL opens 16-bit PGM as mode "I" in the 0..65535 range
    pgm.write_bytes(b"P5\n2 1\n65535\n" + np.array([65535, 32768], ">u2").tobytes())
    loaded = load_image(pgm)
    assert [loaded.getpixel((x, 0)) for x in range(2)] == [WHITE, (128,) * 3]
    beyond = Image.fromarray(np.array([[-5, 70000]], np.int32))
    assert beyond.mode == "I" and [load_image(beyond).getpixel((x, 0))[0] for x in range(2)] == [0, 255]


def test_float_mode_is_read_as_0_to_1():
    assert load_image(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128,) * 3
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(Image.new("F", (2, 2), 200.0))


def test_one_bit_is_black_and_white(tmp_path):
    bits = Image.fromarray(np.array([[True, False, True]]))
    assert bits.mode == "1"
    for source in (bits, _save(bits, tmp_path / "bits.png")):
        assert [load_image(source).getpixel((x, 0)) for x in range(3)] == [WHITE, (0, 0, 0), WHITE]


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB", "RGBX"])
def test_other_modes_convert_close_to_the_original(mode):
    # PIL's own conversions; its HSV and LAB round trips are lossy, so compare on average.
    original = _gradient()
    loaded = load_image(original.convert(mode))
    assert loaded.mode == "RGB" and np.abs(np.asarray(loaded, np.int16) - np.asarray(original, np.int16)).mean() < 2


def test_grey_and_opaque_palette_convert_exactly():
    grey = _gradient().convert("L")
    assert _close(load_image(grey), grey.convert("RGB"), tol=0)
    palette = _gradient().quantize(64)
    assert _close(load_image(palette), palette.convert("RGB"), tol=0)


def test_rgb_is_returned_as_a_new_loaded_image():
    original = _gradient()
    loaded = load_image(original)
    assert loaded is not original and loaded.mode == "RGB" and _close(loaded, original, tol=0)
    loaded.putpixel((0, 0), RED)
    assert original.getpixel((0, 0)) != RED
    assert to_rgb(original) is original


# ---- sources -------------------------------------------------------------------------------------------


def test_every_encoded_source_kind_gives_the_same_image(tmp_path):
    original = _gradient()
    path = _save(original, tmp_path / "g.png")
    data = path.read_bytes()
    with open(path, "rb") as f:
        from_file = load_image(f)
        assert not f.closed  # the caller's file stays the caller's
    sources = [str(path), path, data, bytearray(data), memoryview(data), io.BytesIO(data), Image.open(path)]
    for image in [from_file] + [load_image(s) for s in sources]:
        assert image.mode == "RGB" and _close(image, original, tol=0)


def test_error_names_bytes_and_file_objects():
    with pytest.raises(ImageLoadError) as info:
        load_image(b"junk")
    assert info.value.source == "<bytes of length 4>"
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(io.BytesIO(b"junk"))


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((2, 3), 7, np.uint8), (7, 7, 7)),
        (np.full((2, 3, 1), 7, np.uint8), (7, 7, 7)),
        (np.tile(np.array([1, 2, 3], np.uint8), (2, 3, 1)), (1, 2, 3)),
        (np.tile(np.array([1, 2, 3, 255], np.uint8), (2, 3, 1)), (1, 2, 3)),
        (np.tile(np.array([1, 2, 3, 0], np.uint8), (2, 3, 1)), WHITE),
        (np.tile(np.array([0, 32768, 65535], np.uint16), (2, 3, 1)), (0, 128, 255)),
        (np.full((2, 3), 0.5, np.float32), (128, 128, 128)),
        (np.tile(np.array([0.0, 0.25, 1.0]), (2, 3, 1)), (0, 64, 255)),
        (np.ones((2, 3), bool), WHITE),
    ],
    ids=["HW", "HW1", "HW3", "HW4-opaque", "HW4-clear", "uint16", "float32", "float64", "bool"],
)
def test_numpy_arrays(array, expected):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (3, 2) and image.getpixel((2, 1)) == expected


def test_numpy_array_is_read_row_major_and_not_shared():
    array = np.zeros((2, 3, 3), np.uint8)
    array[1, 2] = RED  # row 1, column 2
    image = load_image(array)
    assert image.getpixel((2, 1)) == RED
    array[1, 2] = 0
    assert image.getpixel((2, 1)) == RED


def test_torch_tensors_are_channels_first():
    chw = torch.zeros(3, 2, 5)
    chw[0] = 1.0
    assert load_image(chw).size == (5, 2) and load_image(chw).getpixel((4, 1)) == RED
    assert load_image(torch.full((1, 4, 4), 64, dtype=torch.uint8)).getpixel((0, 0)) == (64, 64, 64)
    assert load_image(torch.full((4, 4), 0.5, dtype=torch.bfloat16)).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ImageLoadError, match="permute"):
        load_image(torch.zeros(8, 8, 3))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((2, 2), 255.0), r"\[255, 255\]; divide by 255"),
        (np.full((2, 2), -0.5), r"\[0, 1\]"),
        (np.array([[np.nan, 0.5]]), "NaN"),
        (np.zeros((2, 2), np.int64), "dtype int64"),
        (np.zeros((2, 2, 5), np.uint8), r"\(H, W, C\)"),
        (np.zeros((2, 2, 3, 1), np.uint8), r"\(H, W, C\)"),
        (np.zeros((0, 4), np.float32), "no pixels"),
    ],
    ids=["float-0-255", "negative", "nan", "int64", "5-channels", "4-d", "empty"],
)
def test_bad_arrays_are_refused(array, message):
    with pytest.raises(ImageLoadError, match=message) as info:
        load_image(array)
    assert info.value.source.startswith("<array of shape")


@pytest.mark.parametrize("source", [42, None, ["a.jpg"], io.StringIO("text")], ids=["int", "none", "list", "text-io"])
def test_unsupported_source_type_is_a_type_error(source):
    with pytest.raises(TypeError, match="load_image"):
        load_image(source)


# ---- draft ---------------------------------------------------------------------------------------------


def test_draft_decodes_big_jpegs_at_reduced_scale(tmp_path):
    big = _gradient(2000, 1600)
    jpeg = _save(big, tmp_path / "big.jpg", quality=90)
    # The largest reduction (1/2, 1/4, 1/8) that keeps both sides at least as large as asked.
    assert load_image(jpeg, draft_size=(200, 200)).size == (250, 200)
    assert load_image(jpeg, draft_size=(224, 224)).size == (500, 400)
    assert load_image(jpeg, draft_size=(600, 600)).size == (1000, 800)
    assert load_image(jpeg).size == (2000, 1600)
    assert _close(load_image(jpeg, draft_size=(200, 200)), big.resize((250, 200), Image.Resampling.BOX), tol=12)
    png = _save(big, tmp_path / "big.png")
    assert load_image(png, draft_size=(224, 224)).size == (2000, 1600)  # no-op for other formats


def test_draft_size_is_for_the_upright_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(_gradient(1600, 800), tmp_path / "sideways.jpg", exif=exif)  # upright: 800 x 1600
    assert load_image(path, draft_size=(100, 400)).size == (200, 400)


@pytest.mark.parametrize("bad", [(224,), (0, 224), (224.0, 224), 224])
def test_bad_draft_size_is_a_value_error(bad):
    with pytest.raises((ValueError, TypeError), match="draft_size"):
        load_image(_gradient(), draft_size=bad)
