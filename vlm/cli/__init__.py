"""The `vlm` command: a dispatcher. Each verb's module is imported only when that verb runs.

The verbs of the core live in this package (`model`, `zeroshot`), those of training and retrieval in
their packages; arguments every verb shares are in `vlm.cli.args`.

    vlm embed IMAGES... [--text "a dog" ...] [--model NAME_OR_DIR]
    vlm info MODEL
    vlm <verb> --help
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Callable, Sequence

__all__ = ["main", "VERBS"]

# verb -> (module:function taking argv and returning an exit code, one-line help). Packages that
# need accelerate or faiss are imported here only when their verb is asked for.
VERBS: dict[str, tuple[str, str]] = {
    "embed": ("vlm.cli.model:embed_main", "embed images and texts and print their similarities"),
    "info": ("vlm.cli.model:info_main", "describe a model: config, parameter counts, fingerprint"),
    "presets": ("vlm.cli.model:presets_main", "list the model presets"),
    "train": ("training.cli:train_main", "contrastive training from a config file"),
    "finetune": ("training.finetune_cli:finetune_main", "fine-tune the image tower on labelled images"),
    "classify": ("vlm.cli.zeroshot:classify_main", "zero-shot classify images with text labels"),
    "explain": ("vlm.cli.zeroshot:explain_main", "attention and relevance maps for an image"),
    "eval": ("vlm.cli:eval_main", "evaluate: `vlm eval zeroshot DATA` or `vlm eval classify DATA`"),
    "index": ("retrieval.cli:index_main", "build and update image-text search indexes"),
    "search": ("retrieval.cli:search_main", "query a search index by text or image"),
    "serve": ("retrieval.service:serve_main", "serve a search index over HTTP with a web page"),
    "export": ("vlm.cli.export:export_main", "write a model as ONNX, a transformers or an open_clip directory"),
    "demo": ("demo.run:main", "the main job on handwritten digits: train, zero-shot, fine-tune, search, report"),
}

EVAL_VERBS: dict[str, str] = {
    "zeroshot": "vlm.cli.zeroshot:eval_zeroshot_main",
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
        from vlm import __version__

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


if __name__ == "__main__":
    sys.exit(main())
