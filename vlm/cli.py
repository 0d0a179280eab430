"""The `vlm` command. Thin: each verb's module is imported only when that verb runs.

    vlm embed IMAGES... [--text "a dog" ...] [--model NAME_OR_DIR]
    vlm info MODEL
    vlm <verb> --help
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

__all__ = ["main", "VERBS"]

# verb -> (module:function taking argv and returning an exit code, one-line help). Packages that
# need accelerate or faiss are imported here only when their verb is asked for.
VERBS: dict[str, tuple[str, str]] = {
    "embed": ("vlm.cli:embed_main", "embed images and texts and print their similarities"),
    "info": ("vlm.cli:info_main", "describe a model: config, parameter counts, fingerprint"),
    "presets": ("vlm.cli:presets_main", "list the model presets"),
    "train": ("training.cli:train_main", "contrastive training from a config file"),
    "finetune": ("training.finetune_cli:finetune_main", "fine-tune the image tower on labelled images"),
    "classify": ("vlm.zeroshot_cli:classify_main", "zero-shot classify images with text labels"),
    "explain": ("vlm.zeroshot_cli:explain_main", "attention and relevance maps for an image"),
    "eval": ("vlm.cli:eval_main", "evaluate: `vlm eval zeroshot DATA` or `vlm eval classify DATA`"),
    "index": ("retrieval.cli:index_main", "build and update image-text search indexes"),
    "search": ("retrieval.cli:search_main", "query a search index by text or image"),
    "serve": ("retrieval.service:serve_main", "serve a search index over HTTP with a web page"),
    "demo": ("demo.run:main", "the main job on handwritten digits: train, zero-shot, fine-tune, search, report"),
}

EVAL_VERBS: dict[str, str] = {
    "zeroshot": "vlm.zeroshot_cli:eval_zeroshot_main",
    "classify": "training.finetune_cli:eval_classify_main",
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise SystemExit(f"vlm: this installation has no {module_name} ({err}); reinstall vlm") from err
        raise
    return getattr(module, func)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vlm` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"vlm {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"vlm: unknown command {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(_resolve(VERBS[verb][0])(rest) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # A user's mistake: the message names the value and the fix; no traceback.
        print(f"vlm {verb}: error: {err}", file=sys.stderr)
        return 1


def _usage() -> str:
    lines = ["usage: vlm <command> [options]", "", "commands:"]
    lines += [f"  {verb:<10} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`vlm <command> --help` describes each command."]
    return "\n".join(lines)


def eval_main(argv: list[str]) -> int:
    """`vlm eval {zeroshot,classify} ...`: hands the rest of `argv` to the sub-verb; 2 on a bad sub-verb."""
    if not argv or argv[0] not in EVAL_VERBS:
        print(f"usage: vlm eval {{{','.join(EVAL_VERBS)}}} DATA [options]", file=sys.stderr)
        return 2
    return int(_resolve(EVAL_VERBS[argv[0]])(argv[1:]) or 0)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The `--model` / `--pretrained` pair every verb that runs a model accepts."""
    from .defaults import default_model_help

    parser.add_argument("--model", default=None, help=f"model directory, preset or open_clip name ({default_model_help()})")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file for --model")


def load_model_from_args(args: argparse.Namespace):
    """The model that `--model`/`--pretrained` name, or the default model, in eval mode."""
    from .checkpoint import load
    from .defaults import resolve_model

    return load(resolve_model(args.model), pretrained=args.pretrained).eval()


def embed_main(argv: list[str]) -> int:
    """`vlm embed IMAGES --text T ...`: prints the cosine similarity of each image to each text."""
    parser = argparse.ArgumentParser(prog="vlm embed", description="Embed images and texts; print cosine similarities.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--text", action="append", default=[], help="a text to compare against (repeatable)")
    add_model_argument(parser)
    args = parser.parse_args(argv)
    import torch

    from .images import load_image
    from .tokenizer import get_tokenizer
    from .transforms import image_transform

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
    from .config import PRESETS

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


if __name__ == "__main__":
    sys.exit(main())
