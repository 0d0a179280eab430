"""Writing a vlm model in the formats other tools open: transformers directories (`save_hf`), open_clip's
own directory format (`save_open_clip`) and ONNX graphs with their preprocessing (`export_onnx`).

Each writer fills a hidden directory next to the target and renames it into place (`vlm.files.atomic_directory`),
so a failed export never leaves a half-written directory, and each writes a model card (`vlm.model_card`).
The writers are imported when first used: ONNX export needs onnx and onnxruntime, the others transformers
or open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["export_onnx", "save_hf", "save_open_clip"]

_WRITERS = {"export_onnx": ".onnx_export", "save_hf": ".hf", "save_open_clip": ".open_clip_dir"}


def __getattr__(name: str) -> Any:
    if name not in _WRITERS:
        raise AttributeError(f"module 'vlm.export' has no attribute {name!r}")
    return getattr(importlib.import_module(_WRITERS[name], __name__), name)
