"""vlm: CLIP-style vision-language models.

One Transformer serves as the ViT image encoder and, with a causal mask, as the text encoder; the
weights interoperate with open_clip and Hugging Face transformers.
"""

from .checkpoint import load, load_state_dict_file, save_pretrained
from .config import CLIPConfig, TextConfig, VisionConfig
from .convert import from_hf, from_open_clip, to_hf, to_open_clip
from .images import ImageLoadError, load_image
from .model import CLIP, CLIPOutput, create_model
from .presets import PRESETS, get_preset, list_presets
from .tokenizer import Tokenizer, get_tokenizer
from .transforms import image_transform
from .zeroshot import ZeroShotClassifier, build_classifier

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPOutput",
    "ImageLoadError",
    "PRESETS",
    "TextConfig",
    "Tokenizer",
    "VisionConfig",
    "ZeroShotClassifier",
    "build_classifier",
    "create_model",
    "from_hf",
    "from_open_clip",
    "get_preset",
    "get_tokenizer",
    "image_transform",
    "list_presets",
    "load",
    "load_image",
    "load_state_dict_file",
    "save_pretrained",
    "to_hf",
    "to_open_clip",
]
