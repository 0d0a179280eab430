"""The main job of `make demo`: embed the sample photos that ship with scikit-image and print their
similarity to a few prompts.

With no model hub reachable, the default is a randomly initialised ViT-B-32, so the numbers only show
the pipeline working end to end; pass ``--model`` (a saved directory, a Hugging Face CLIP directory,
or an open_clip name with ``--pretrained``) for meaningful similarities.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .checkpoint import load
from .cli import format_similarity_table
from .images import load_image
from .tokenizer import get_tokenizer
from .transforms import image_transform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
PROMPTS = ("a photo of an astronaut", "a cup of coffee", "a photo of a cat", "a rocket on the launch pad")


def sample_photos() -> dict[str, object]:
    """scikit-image's bundled photos as arrays, by name."""
    from skimage import data

    return {name: getattr(data, name)() for name in PHOTOS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm.demo", description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = load(args.model, pretrained=args.pretrained).eval()
    transform = image_transform(model)
    photos = sample_photos()
    images = torch.stack([transform(load_image(array)) for array in photos.values()])
    with torch.inference_mode():
        xb = model.encode_image(images, normalize=True)
        xq = model.encode_text(get_tokenizer(model)(list(PROMPTS)), normalize=True)
    print(f"model {args.model} ({'pretrained ' + args.pretrained if args.pretrained else 'random weights'}), "
          f"fingerprint {model.fingerprint()}")
    print(format_similarity_table(list(photos), list(PROMPTS), (xb @ xq.T).tolist()))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
