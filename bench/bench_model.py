"""Image and text tower speed against open_clip and transformers on the same weights (fp32, CPU).

    .venv/bin/python bench/bench_model.py [--model ViT-B-32] [--batch 32] [--repeats 3]

Prints images/s (texts/s) for each library and vlm's ratio to each, all measured in this run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import best_time, print_table  # noqa: E402

import vlm  # noqa: E402


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import open_clip

    torch.manual_seed(0)
    oc = open_clip.create_model(args.model).eval()
    model = vlm.from_open_clip(oc).eval()
    hf = vlm.to_hf(model).eval()
    images = torch.randn(args.batch, 3, model.config.vision.image_size, model.config.vision.image_size)

    with torch.inference_mode():
        ref = oc.encode_image(images)
        assert torch.allclose(model.encode_image(images), ref, atol=1e-4), "image parity with open_clip"
        assert torch.allclose(_features(hf.get_image_features(pixel_values=images)), ref, atol=1e-4), "HF parity"
        t_vlm = best_time(lambda: model.encode_image(images), args.repeats)
        t_oc = best_time(lambda: oc.encode_image(images), args.repeats)
        t_hf = best_time(lambda: hf.get_image_features(pixel_values=images), args.repeats)
    n = args.batch
    print_table(
        f"image tower {args.model}, batch {n}, fp32",
        [
            ("vlm", f"{n / t_vlm:.1f}", "1.00"),
            ("open_clip", f"{n / t_oc:.1f}", f"{t_oc / t_vlm:.2f}"),
            ("transformers", f"{n / t_hf:.1f}", f"{t_hf / t_vlm:.2f}"),
        ],
        ("library", "images/s", "vlm speed-up"),
    )

    tokenizer = vlm.get_tokenizer(model)
    prompts = [f"a photo of a {w}, a type of {k}." for w in ("dog", "cat", "red car", "handwritten seven") for k in ("pet", "thing", "object", "digit")]
    texts = (prompts * (args.text_batch // len(prompts) + 1))[: args.text_batch]
    tokens = tokenizer(texts)
    positions = int(tokens.argmax(-1).max()) + 1
    with torch.inference_mode():
        ref = oc.encode_text(tokens)
        assert torch.allclose(model.encode_text(tokens), ref, atol=1e-4), "text parity with open_clip"
        t_vlm = best_time(lambda: model.encode_text(tokens), args.repeats)
        t_oc = best_time(lambda: oc.encode_text(tokens), args.repeats)
        t_hf = best_time(lambda: hf.get_text_features(input_ids=tokens), args.repeats)
    n = len(texts)
    print_table(
        f"text tower {args.model}, {n} prompts of <= {positions} tokens, fp32",
        [
            ("vlm", f"{n / t_vlm:.1f}", "1.00"),
            ("open_clip", f"{n / t_oc:.1f}", f"{t_oc / t_vlm:.2f}"),
            ("transformers", f"{n / t_hf:.1f}", f"{t_hf / t_vlm:.2f}"),
        ],
        ("library", "texts/s", "vlm speed-up"),
    )


if __name__ == "__main__":
    main()
