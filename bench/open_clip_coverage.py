"""How many of open_clip's pretrained tags vlm loads with parity, measured here.

    .venv/bin/python bench/open_clip_coverage.py [--names ViT-B-16-SigLIP,...]

Every architecture that has a pretrained tag (`open_clip.list_pretrained()`) is built at reduced depth (two
blocks per tower; text vocabularies other than CLIP's cut to 1000 ids) with seeded random weights, loaded
into vlm, and checked: normalised image and text embeddings and the logits (with `logit_bias`) within 1e-4 of
open_clip's, and `vlm.to_open_clip` giving back open_clip's state dict exactly. An architecture vlm does not
implement is listed with what it lacks. Prints a line per architecture, then the tags covered.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import torch

# Architectures with a Hugging Face text tower need its config from the hub: say no at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
from test_families import reduced_open_clip, text_batch  # noqa: E402

import vlm  # noqa: E402

ATOL = 1e-4


def _unsupported(name: str) -> str | None:
    """Why vlm cannot read architecture `name`, from its meta-device build; None when it can."""
    import open_clip

    try:
        with torch.device("meta"):
            oc = open_clip.create_model(name, device="meta")
    except Exception as err:  # open_clip needs a download for Hugging Face text towers
        return f"open_clip cannot build it offline ({type(err).__name__})"
    try:
        vlm.convert.config_from_open_clip(oc, vlm.convert.open_clip_model_config(name))
    except ValueError as err:
        return str(err).split(", which vlm")[0].replace("this open_clip model uses ", "")
    return None


def _parity(name: str) -> float:
    """The largest difference to open_clip over embeddings and logits; AssertionError for an inexact round trip."""
    import open_clip

    hf_vocabulary = bool(open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name"))
    oc = reduced_open_clip(name, **({"vocab_size": 1000} if hf_vocabulary else {}))
    model = vlm.from_open_clip(oc, model_name=name).eval()
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = text_batch(model.config.text)
    with torch.no_grad():
        pairs = [
            (model.encode_image(images, normalize=True), oc.encode_image(images, normalize=True)),
            (model.encode_text(text, normalize=True), oc.encode_text(text, normalize=True)),
            (model(images, text).logits_per_image, oc.get_logits(images, text)[0]),
        ]
    back = vlm.to_open_clip(model).state_dict()
    theirs = oc.state_dict()
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs), "round trip"
    return max(float((a - b).abs().max()) for a, b in pairs)


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", help="comma-separated architectures (default: every one with a pretrained tag)")
    args = parser.parse_args()
    tags = collections.Counter(name for name, _ in open_clip.list_pretrained())
    names = args.names.split(",") if args.names else list(tags)
    covered = 0
    for name in names:
        start = time.perf_counter()
        reason = _unsupported(name)
        if reason is None:
            try:
                diff = _parity(name)
                reason = None if diff <= ATOL else f"differs by {diff:.1e}"
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"[:120]
        status = "parity" if reason is None else "no"
        if reason is None:
            covered += tags[name]
            reason = f"max difference {diff:.1e}"
        print(f"{name:34s} {tags[name]:3d} tag(s)  {status:6s} {reason}  ({time.perf_counter() - start:.0f} s)", flush=True)
    total = sum(tags[name] for name in names)
    print(f"\n{covered} of {total} pretrained tags load with parity (open_clip {open_clip.__version__})")


if __name__ == "__main__":
    main()
