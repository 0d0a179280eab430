"""open_clip's own directory format: `save_open_clip(model, directory)`.

The directory is what open_clip's hub repositories hold and what its ``local-dir:`` loader reads:
``open_clip_config.json`` (``model_cfg``: the architecture open_clip builds; ``preprocess_cfg``: mean, std,
interpolation and resize mode), ``open_clip_model.safetensors`` (open_clip's key names) and, for a Hugging Face
tokenizer, its files (open_clip's ``get_tokenizer("local-dir:...")`` reads them from the directory whenever
``text_cfg.hf_tokenizer_name`` is set; CLIP's byte-pair vocabulary ships with open_clip). Then
``open_clip.create_model_and_transforms(f"local-dir:{directory}")`` and ``open_clip.get_tokenizer(...)`` give
vlm's embeddings, preprocessing and token ids, and `vlm.load(directory)` reads it back.

Image towers that open_clip keeps as a timm trunk (no class token, a patch bias, SigLIP's attention pooling)
are built by open_clip from a registered timm model name, with no way to pass other sizes: such a tower is
written under the name of the open_clip model with the same architecture (``vit_base_patch16_siglip_224`` for
a ViT-B-16-SigLIP), and one that matches none is refused with the list of those that do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..config import CLIP_TOKENIZER, CLIPConfig, VisionConfig
from ..files import atomic_directory

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import CLIP
    from ..model_card import ModelCard

__all__ = ["open_clip_config", "save_open_clip"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# timm's pooling names for vlm's, and open_clip's projection names for a timm trunk's head.
_TIMM_POOL = {"token": "token", "avg": "avg", "map": "map", "none": ""}
_TIMM_PROJ = {"none": "none", "linear": "linear", "linear_bias": "linear"}


def save_open_clip(model: CLIP, directory: str | Path, *, card: ModelCard | None = None) -> Path:
    """Writes `model` as an open_clip model directory (`open_clip_config.json`, `open_clip_model.safetensors`,
    the Hugging Face tokenizer's files when the model has one, and a model card); returns the directory.

    The directory is filled aside and renamed into place: a failure leaves `directory` as it was. ValueError,
    before anything is written, when open_clip cannot build the architecture. open_clip has no shared towers:
    a ``share_transformer`` model is written with a copy per tower, and reads back unshared.
    """
    from safetensors.torch import save_file

    from ..convert import vlm_state_dict_to_open_clip
    from ..model_card import write_model_card
    from ..tokenizer import get_tokenizer

    config = model.config
    cfg = open_clip_config(config)
    # The tokenizer files are found (or their absence reported) before the directory is touched.
    tokenizer = None if config.text.tokenizer == CLIP_TOKENIZER else get_tokenizer(model)
    state = _unshared(vlm_state_dict_to_open_clip(model.state_dict(), config))
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_model_card(tmp, model, fmt="open_clip", card=card)
    logger.info("saved an open_clip model in %s", directory)
    return directory


def open_clip_config(config: CLIPConfig) -> dict[str, Any]:
    """The content of `open_clip_config.json` for this architecture: ``model_cfg`` (what open_clip's
    `CLIP` / `CustomTextCLIP` take) and ``preprocess_cfg``. ValueError when open_clip cannot build it."""
    from ..convert.open_clip_config import open_clip_text_cfg, open_clip_vision_cfg
    from ..convert.open_clip_format import Layout

    v, t = config.vision, config.text
    layout = Layout.for_config(config)
    text_cfg = open_clip_text_cfg(t)
    if t.tokenizer != CLIP_TOKENIZER:
        # open_clip reads the files of a local-dir from the directory itself; the name says where they came from.
        text_cfg["hf_tokenizer_name"] = t.tokenizer
        text_cfg["tokenizer_kwargs"] = {"clean": t.tokenizer_clean, "strip_sep_token": t.strip_sep_token}
    # open_clip's quick_gelu sets the activation of its own towers; a timm trunk keeps the one its name implies.
    quick_gelu = t.activation == "quick_gelu"
    model_cfg: dict[str, Any] = dict(embed_dim=config.embed_dim, quick_gelu=quick_gelu)
    if layout.timm_vision:
        model_cfg.update(vision_cfg=_timm_vision_cfg(config), custom_text=True)
    elif (v.activation == "quick_gelu") != quick_gelu:
        raise ValueError(
            f"open_clip uses QuickGELU in both towers or in neither; this model has {v.activation} (vision) "
            f"and {t.activation} (text)"
        )
    else:
        model_cfg["vision_cfg"] = open_clip_vision_cfg(v)
    model_cfg.update(text_cfg=text_cfg, init_logit_scale=config.init_logit_scale)
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    preprocess_cfg = dict(
        mean=list(v.image_mean), std=list(v.image_std), interpolation=v.interpolation, resize_mode=v.resize_mode
    )
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def _timm_vision_cfg(config: CLIPConfig) -> dict[str, Any]:
    """The ``vision_cfg`` of the open_clip model whose timm image tower has this architecture."""
    import open_clip

    from ..presets import PRESETS

    wanted = (_architecture(config.vision), config.embed_dim if config.vision.proj != "none" else None)
    candidates = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        timm_name = cfg["vision_cfg"].get("timm_model_name")
        if not timm_name or name not in PRESETS:
            continue
        preset = PRESETS[name]
        candidates.append(name)
        if (_architecture(preset.vision), preset.embed_dim if preset.vision.proj != "none" else None) == wanted:
            v = config.vision
            return dict(
                image_size=v.image_size, timm_model_name=timm_name, timm_model_pretrained=False,
                timm_pool=_TIMM_POOL[v.pool], timm_proj=_TIMM_PROJ[v.proj], timm_proj_bias=v.proj == "linear_bias",
                patch_dropout=v.patch_dropout,
            )
    raise ValueError(
        "open_clip builds an image tower without class token, with a patch bias or with attention pooling as a "
        "timm trunk named by timm's model registry, with no way to give other sizes; this tower "
        f"(width={config.vision.width}, depth={config.vision.depth}, patch_size={config.vision.patch_size}, "
        f"image_size={config.vision.image_size}) matches none of open_clip's ({', '.join(candidates)}). "
        "Save it with vlm.save_hf (transformers) or save_pretrained instead"
    )


def _architecture(vision: VisionConfig) -> VisionConfig:
    """The tower without its preprocessing, without the position-embedding resampling, which only matters at
    another resolution than the one the weights are written for, and without patch dropout (training only)."""
    return dataclasses.replace(
        vision, image_mean=(0.0,) * 3, image_std=(1.0,) * 3, interpolation="bicubic", resize_mode="shortest",
        pos_embed_resample="bicubic", patch_dropout=0.0,
    )


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, each with storage of its own: safetensors refuses tensors that share memory
    (a model with ``share_transformer`` holds one set of block weights under both towers' names)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out
