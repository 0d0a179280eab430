"""Converters between vlm's state dict and open_clip's / transformers', in both directions.

Every foreign key name lives in this package: `tables` holds the machinery (one table of rows (vlm keys,
foreign key, how) serves both directions, so round trips are exact), `open_clip_format` open_clip's
layouts (its own ViT or a timm trunk; the text tower flat or under ``text.``), `open_clip_config` open_clip's
architectures (an open_clip module's config, and the open_clip module of a config), `hf_format` transformers'
CLIPModel, SiglipModel, Siglip2Model and MetaClip2Model.
"""

from .hf_format import (
    HF_FAMILIES,
    config_from_hf,
    from_hf,
    hf_config_from_vlm,
    hf_family,
    hf_state_dict_to_vlm,
    to_hf,
    vlm_state_dict_to_hf,
)
from .open_clip_config import config_from_open_clip, open_clip_model_config
from .open_clip_format import from_open_clip, open_clip_state_dict_to_vlm, to_open_clip, vlm_state_dict_to_open_clip
from .tables import detect_state_dict_format, load_into, model_from_state

__all__ = [
    "HF_FAMILIES",
    "config_from_hf",
    "config_from_open_clip",
    "detect_state_dict_format",
    "from_hf",
    "from_open_clip",
    "hf_config_from_vlm",
    "hf_family",
    "hf_state_dict_to_vlm",
    "load_into",
    "model_from_state",
    "open_clip_model_config",
    "open_clip_state_dict_to_vlm",
    "to_hf",
    "to_open_clip",
    "vlm_state_dict_to_hf",
    "vlm_state_dict_to_open_clip",
]
