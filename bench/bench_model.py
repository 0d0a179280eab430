"""Image and text tower speed against open_clip and transformers on the same weights (fp32, CPU).

    .venv/bin/python bench/bench_model.py [--models ViT-B-32,ViT-B-16-SigLIP,ViT-B-16-SigLIP2] [--batch 32]

For each open_clip model name: random weights in open_clip, the same weights in vlm (`vlm.from_open_clip`) and
in transformers (`vlm.to_hf`: CLIPModel, or SiglipModel for SigLIP and SigLIP 2), outputs checked equal (1e-4),
then images/s and texts/s of each library and vlm's ratio to each, timed in interleaved rounds in this run.
Text for CLIP models is real prompts through vlm's tokenizer (the causal tower runs only up to the last
end-of-text token); SigLIP's bidirectional towers always read the whole context, and their vocabularies cannot
be downloaded here, so their rows are tokenizer-shaped ids (text, end-of-text, padding to the context length),
64 of them at most.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_best_times, print_table  # noqa: E402

import vlm  # noqa: E402

PROMPTS = [f"a photo of a {w}, a type of {k}." for w in ("dog", "cat", "red car", "handwritten seven") for k in ("pet", "thing", "object", "digit")]


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _text(model: vlm.CLIP, n: int) -> tuple[torch.Tensor, str]:
    config = model.config.text
    if config.tokenizer == "clip":
        tokens = vlm.get_tokenizer(model)((PROMPTS * (n // len(PROMPTS) + 1))[:n])
        return tokens, f"prompts of <= {int(model.text.pool_positions(tokens).max()) + 1} tokens"
    n = min(n, 64)  # every row runs the whole context: fewer rows keep a run within minutes
    g = torch.Generator().manual_seed(0)
    tokens = torch.full((n, config.context_length), config.pad_id, dtype=torch.long)
    for row in range(n):
        length = 6 + row % 10
        tokens[row, :length] = torch.randint(3, config.vocab_size, (length,), generator=g)
        tokens[row, length] = 1  # end-of-text of the T5 and Gemma vocabularies
    return tokens, f"rows of {config.context_length} ids"


def _ratios(title: str, unit: str, n: int, times: dict[str, float]) -> None:
    rows = [(name, f"{n / t:.1f}", f"{t / times['vlm']:.2f}") for name, t in times.items()]
    print_table(title, rows, ("library", unit, "vlm speed-up"))


def bench(name: str, batch: int, text_batch: int, rounds: int) -> None:
    import open_clip

    torch.manual_seed(0)
    oc = open_clip.create_model(name).eval()
    model = vlm.from_open_clip(oc, model_name=name).eval()
    hf = vlm.to_hf(model).eval()
    size = model.config.vision.image_size
    images = torch.randn(batch, 3, size, size)
    tokens, described = _text(model, text_batch)
    text_batch = len(tokens)
    with torch.inference_mode():
        ref = oc.encode_image(images)
        assert torch.allclose(model.encode_image(images), ref, atol=1e-4), "image parity with open_clip"
        assert torch.allclose(_features(hf.get_image_features(pixel_values=images)), ref, atol=1e-4), "HF image parity"
        ref = oc.encode_text(tokens)
        assert torch.allclose(model.encode_text(tokens), ref, atol=1e-4), "text parity with open_clip"
        assert torch.allclose(_features(hf.get_text_features(input_ids=tokens)), ref, atol=1e-4), "HF text parity"
        image_times = interleaved_best_times(
            {
                "vlm": lambda: model.encode_image(images),
                "open_clip": lambda: oc.encode_image(images),
                "transformers": lambda: hf.get_image_features(pixel_values=images),
            },
            rounds,
        )
        text_times = interleaved_best_times(
            {
                "vlm": lambda: model.encode_text(tokens),
                "open_clip": lambda: oc.encode_text(tokens),
                "transformers": lambda: hf.get_text_features(input_ids=tokens),
            },
            rounds,
        )
    hf_class = type(hf).__name__
    _ratios(f"image tower {name} (transformers {hf_class}), batch {batch}, fp32", "images/s", batch, image_times)
    _ratios(f"text tower {name}, {text_batch} {described}, fp32", "texts/s", text_batch, text_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-32,ViT-B-16-SigLIP,ViT-B-16-SigLIP2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--text-batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for name in args.models.split(","):
        bench(name, args.batch, args.text_batch, args.rounds)


if __name__ == "__main__":
    main()
