"""image_transform: bit-exact parity with open_clip's preprocessing, and a transform that pickles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import skimage.data
import torch
from open_clip.transform import image_transform as open_clip_transform
from PIL import Image

from vlm.config import CLIPConfig, VisionConfig
from vlm.transforms import ImageTransform, image_transform


def _noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Real photos of different aspect ratios, and sizes that stress rounding: very long and thin, already the
# target size, one pixel off, and upsampling from tiny.
IMAGES = {
    "astronaut": lambda: Image.fromarray(skimage.data.astronaut()),  # 512 x 512
    "coffee": lambda: Image.fromarray(skimage.data.coffee()),  # 600 x 400
    "chelsea": lambda: Image.fromarray(skimage.data.chelsea()),  # 451 x 300
    "rocket": lambda: Image.fromarray(skimage.data.rocket()),  # 640 x 427
    "camera-grey": lambda: Image.fromarray(skimage.data.camera()),  # mode L
    "225x999": lambda: _noise(225, 999),
    "1x500": lambda: _noise(1, 500),
    "500x3": lambda: _noise(500, 3),
    "224x224": lambda: _noise(224, 224),
    "223x225": lambda: _noise(223, 225),
    "10x10": lambda: _noise(10, 10),
}


def _reference(vision: VisionConfig, train: bool = False):
    return open_clip_transform(
        vision.image_size,
        is_train=train,
        mean=vision.image_mean,
        std=vision.image_std,
        resize_mode=vision.resize_mode,
        interpolation=vision.interpolation,
    )


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_eval_transform_equals_open_clip(name, interpolation, resize_mode):
    vision = VisionConfig(interpolation=interpolation, resize_mode=resize_mode)
    image = IMAGES[name]()
    ours = image_transform(vision)(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, _reference(vision)(image))


@pytest.mark.parametrize("name", ["coffee", "225x999", "10x10"])
def test_eval_transform_equals_open_clip_at_a_small_size_and_other_stats(name):
    vision = VisionConfig(image_size=32, patch_size=8, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    image = IMAGES[name]()
    assert torch.equal(image_transform(vision)(image), _reference(vision)(image))


def test_train_transform_matches_open_clip_for_the_same_seed():
    vision = VisionConfig()
    ours, reference = image_transform(vision, train=True), _reference(vision, train=True)
    # A square photo: for one as wide as rocket (1.5:1) no crop of 90% of the area fits the aspect-ratio
    # range, and torchvision falls back to a fixed centre crop.
    image = IMAGES["astronaut"]()
    for seed in range(3):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(ours(image), expected)
    assert ours(image).shape == (3, 224, 224)
    assert not torch.equal(ours(image), ours(image))  # it is random


def test_config_model_and_clip_config_give_the_same_transform():
    config = CLIPConfig(vision=VisionConfig(image_size=256, patch_size=32, resize_mode="squash"))

    class Model:
        pass

    model = Model()
    model.config = config
    expected = ImageTransform(256, config.vision.image_mean, config.vision.image_std, "bicubic", "squash", False)
    assert image_transform(config) == image_transform(config.vision) == image_transform(model) == expected
    with pytest.raises(TypeError, match="VisionConfig"):
        image_transform({"image_size": 224})


def test_transform_pickles_and_reads_well():
    transform = image_transform(VisionConfig(), train=False)
    restored = pickle.loads(pickle.dumps(transform))
    assert restored == transform
    image = IMAGES["chelsea"]()
    assert torch.equal(restored(image), transform(image))
    assert repr(transform).startswith("ImageTransform(image_size=224, mean=(0.48145466")
    assert "resize_mode='shortest'" in repr(transform) and "train=False" in repr(transform)


def test_transparent_pixels_become_white_like_load_image():
    transform = image_transform(VisionConfig(image_size=32, patch_size=8))
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert torch.equal(transform(clear), transform(Image.new("RGB", (40, 40), (255, 255, 255))))


def test_bad_inputs_are_refused():
    transform = image_transform(VisionConfig())
    with pytest.raises(TypeError, match="load_image"):
        transform(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="resize_mode"):
        ImageTransform(224, (0.5,) * 3, (0.5,) * 3, resize_mode="longest")
