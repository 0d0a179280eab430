"""vlm: CLIP-style vision-language models.

One Transformer serves as the ViT image encoder and, with a causal mask, as the text encoder; the
weights interoperate with open_clip and Hugging Face transformers.

The public names are imported when first used (PEP 562), so that `import vlm.onnx` runs an ONNX export
without importing torch; `from vlm import CLIP` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_PUBLIC = {
    "CLIP": ".model",
    "CLIPConfig": ".config",
    "CLIPOutput": ".model",
    "ImageLoadError": ".images",
    "OnnxCLIP": ".onnx",
    "PRESETS": ".presets",
    "TextConfig": ".config",
    "Tokenizer": ".tokenizer",
    "VisionConfig": ".config",
    "ZeroShotClassifier": ".zeroshot",
    "build_classifier": ".zeroshot",
    "create_model": ".model",
    "export_onnx": ".export",
    "from_hf": ".convert",
    "from_open_clip": ".convert",
    "get_preset": ".presets",
    "get_tokenizer": ".tokenizer",
    "image_transform": ".transforms",
    "list_presets": ".presets",
    "load": ".checkpoint",
    "load_image": ".images",
    "load_state_dict_file": ".checkpoint",
    "save_hf": ".export",
    "save_open_clip": ".export",
    "save_pretrained": ".checkpoint",
    "to_hf": ".convert",
    "to_open_clip": ".convert",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from .checkpoint import load, load_state_dict_file, save_pretrained
    from .config import CLIPConfig, TextConfig, VisionConfig
    from .convert import from_hf, from_open_clip, to_hf, to_open_clip
    from .export import export_onnx, save_hf, save_open_clip
    from .images import ImageLoadError, load_image
    from .model import CLIP, CLIPOutput, create_model
    from .onnx import OnnxCLIP
    from .presets import PRESETS, get_preset, list_presets
    from .tokenizer import Tokenizer, get_tokenizer
    from .transforms import image_transform
    from .zeroshot import ZeroShotClassifier, build_classifier


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # `vlm.model` and the like: a submodule not imported yet
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
