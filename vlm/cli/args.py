"""Arguments and helpers every command shares: the model flags, loading the model they name."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager

__all__ = [
    "add_model_argument",
    "add_source_arguments",
    "add_text_overflow_argument",
    "load_model_from_args",
    "text_overflow_from_args",
]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The `--model` / `--pretrained` pair every verb that runs a model accepts."""
    from vlm.defaults import default_model_help

    parser.add_argument("--model", default=None, help=f"model directory, preset or open_clip name ({default_model_help()})")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file for --model")


def load_model_from_args(args: argparse.Namespace):
    """The model that `--model`/`--pretrained` name, or the default model, in eval mode."""
    from vlm.checkpoint import load
    from vlm.defaults import resolve_model

    return load(resolve_model(args.model), pretrained=args.pretrained).eval()


def add_source_arguments(
    parser: argparse.ArgumentParser, *, text: bool = False, label: bool = False, split: str | None = None
) -> None:
    """The source flags every data-taking verb shares: `--split` (default `split`), `--image-column` and,
    when the verb reads them, `--text-column` and `--label-column`. Columns left unnamed are found by
    their usual names (`vlm.data.columns`)."""
    from vlm.data import COLUMN_ROLES

    parser.add_argument("--split", default=split, help="the split of a Hugging Face dataset (hf:NAME_OR_DIR)")
    for role in ("image", *(("text",) if text else ()), *(("label",) if label else ())):
        usual = ", ".join(COLUMN_ROLES[role].names[:4])
        parser.add_argument(
            COLUMN_ROLES[role].flag,
            default=None,
            help=f"the {role} column of a table or a Hugging Face dataset (default: found by name: {usual}, ...)",
        )


def add_text_overflow_argument(parser: argparse.ArgumentParser) -> None:
    """`--text-overflow`, on every verb that tokenizes the user's text (class names and prompts, captions,
    queries): what to do with a text longer than the model's context."""
    from vlm.overflow import OVERFLOW_POLICIES

    parser.add_argument(
        "--text-overflow",
        choices=OVERFLOW_POLICIES,
        default="truncate",
        help="a text longer than the model's context: keep its first tokens, with a warning and a count "
        "(truncate, the default, as open_clip), or stop naming it (error)",
    )


def text_overflow_from_args(args: argparse.Namespace) -> AbstractContextManager[None]:
    """The block in which the verb's tokenizers follow `--text-overflow` and name the flag in their messages."""
    from vlm.overflow import overflow_policy

    return overflow_policy(args.text_overflow, "--text-overflow {}")
