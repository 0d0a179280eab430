"""The default model: what commands use when no `--model` is given.

Order: the ``VLM_MODEL`` environment variable, then the model recorded by `set_default_model`
(the demo records the model it trains) in ``$VLM_HOME/default_model`` (``~/.cache/vlm`` by default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .files import atomic_write_text

__all__ = ["vlm_home", "resolve_model", "set_default_model", "get_default_model", "default_model_help"]

logger = logging.getLogger(__name__)


def vlm_home() -> Path:
    """Where vlm keeps per-user state (the default-model record): $VLM_HOME, else ~/.cache/vlm."""
    return Path(os.environ.get("VLM_HOME") or Path.home() / ".cache" / "vlm")


def _record() -> Path:
    return vlm_home() / "default_model"


def get_default_model() -> str | None:
    """The default model's name or directory, or None when none is set."""
    if os.environ.get("VLM_MODEL"):
        return os.environ["VLM_MODEL"]
    record = _record()
    if record.is_file():
        value = record.read_text().strip()
        return value or None
    return None


def set_default_model(name_or_dir: str | Path) -> Path:
    """Records `name_or_dir` (a directory is stored as an absolute path) as the default model."""
    value = str(Path(name_or_dir).resolve()) if Path(name_or_dir).exists() else str(name_or_dir)
    record = _record()
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, value + "\n")
    logger.info("default model is now %s (recorded in %s)", value, record)
    return record


def resolve_model(name: str | None) -> str:
    """`name` if given, else the default model; ValueError with the fix when there is neither."""
    if name:
        return name
    default = get_default_model()
    if default is None:
        raise ValueError(
            "no model given and no default model set: pass --model DIR_OR_NAME (a saved model directory, "
            "a preset such as ViT-B-32, a Hugging Face CLIP directory), set VLM_MODEL, or run `make demo`, "
            "which trains a model and makes it the default"
        )
    return default


def default_model_help() -> str:
    """The default model for `--help` texts, or a note that none is set."""
    default = get_default_model()
    return f"default: {default}" if default else "no default set yet"
