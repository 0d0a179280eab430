"""The model verbs: `vlm embed`, `vlm info`, `vlm presets`."""

from __future__ import annotations

import argparse

from .args import add_model_argument, load_model_from_args

__all__ = ["embed_main", "info_main", "presets_main"]


def embed_main(argv: list[str]) -> int:
    """`vlm embed IMAGES --text T ...`: prints the cosine similarity of each image to each text."""
    parser = argparse.ArgumentParser(prog="vlm embed", description="Embed images and texts; print cosine similarities.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--text", action="append", default=[], help="a text to compare against (repeatable)")
    add_model_argument(parser)
    args = parser.parse_args(argv)
    import torch

    from vlm.images import load_image
    from vlm.tokenizer import get_tokenizer
    from vlm.transforms import image_transform

    model = load_model_from_args(args)
    transform = image_transform(model)
    images = torch.stack([transform(load_image(path)) for path in args.images])
    texts = args.text or ["a photo"]
    with torch.inference_mode():
        xb = model.encode_image(images, normalize=True)
        xq = model.encode_text(get_tokenizer(model)(texts), normalize=True)
    print(format_similarity_table([str(p) for p in args.images], texts, (xb @ xq.T).tolist()))
    return 0


def format_similarity_table(rows: list[str], columns: list[str], values: list[list[float]]) -> str:
    """A plain-text table of `values[i][j]` with row and column labels."""
    width = max(len(r) for r in rows)
    head = " " * width + "  " + "  ".join(f"{c[:18]:>18}" for c in columns)
    body = [f"{r:<{width}}  " + "  ".join(f"{v:>18.4f}" for v in vals) for r, vals in zip(rows, values)]
    return "\n".join([head, *body])


def info_main(argv: list[str]) -> int:
    """`vlm info [MODEL]`: prints the model's config, its parameter counts per tower and its fingerprint."""
    parser = argparse.ArgumentParser(prog="vlm info", description="Describe a model.")
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--pretrained", default=None)
    args = parser.parse_args(argv)
    model = load_model_from_args(args)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(model.config.to_json())
    print(f"parameters: image tower {count(model.visual):,}, text tower {count(model.text):,}, total {count(model):,}")
    print(f"fingerprint: {model.fingerprint()}")
    return 0


def presets_main(argv: list[str]) -> int:
    """`vlm presets`: one line per preset (image size/patch, widths, depths, context, embedding size)."""
    from vlm.presets import PRESETS

    argparse.ArgumentParser(prog="vlm presets", description="List the model presets.").parse_args(argv)
    width = max(map(len, PRESETS))
    for name, c in PRESETS.items():
        v, t = c.vision, c.text
        text = "causal" if t.causal else "bidirectional"
        print(
            f"{name:<{width}}  image {v.image_size}px/{v.patch_size} w{v.width} d{v.depth} pool {v.pool}  "
            f"text w{t.width} d{t.depth} ctx{t.context_length} {text}  embed {c.embed_dim}"
        )
    return 0
