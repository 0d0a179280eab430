"""open_clip's state dicts and models, both ways: one table per layout serves both directions.

open_clip stores the same architecture in three layouts, all read from key names alone:

- its own `VisionTransformer` under ``visual.*`` (OpenAI's CLIP, LAION's, CLIPA, MetaCLIP 2 worldwide), or a
  timm `VisionTransformer` trunk under ``visual.trunk.*`` (SigLIP, SigLIP 2, MobileCLIP 2 L/14), whose
  projection, if any, is timm's classifier ``visual.trunk.head`` or open_clip's ``visual.head.proj``;
- the text tower at the top level (`CLIP`: ``token_embedding``, ``transformer.*``) or under ``text.*``
  (`CustomTextCLIP`).

The architectures themselves (an open_clip module's `CLIPConfig`, the open_clip module of a `CLIPConfig`)
are read and built in `open_clip_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor, nn

from ..config import CLIPConfig, TextConfig, VisionConfig
from ..model import CLIP
from .open_clip_config import (
    config_from_open_clip,
    open_clip_model_config,
    open_clip_text_cfg,
    open_clip_vision_cfg,
    timm_tower,
)
from .tables import Row, block_rows, from_vlm, linear_rows, model_from_state, norm_rows, stack_rows, to_vlm, unread_keys

__all__ = [
    "from_open_clip",
    "open_clip_state_dict_to_vlm",
    "to_open_clip",
    "vlm_state_dict_to_open_clip",
]

_OC_BLOCK = (
    (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.in_proj_{}", "cat"),
    (("norm1",), "ln_1.{}", "same"),
    (("attn.out_proj",), "attn.out_proj.{}", "same"),
    (("norm2",), "ln_2.{}", "same"),
    (("mlp.fc1",), "mlp.c_fc.{}", "same"),
    (("mlp.fc2",), "mlp.c_proj.{}", "same"),
)
_OC_LAYER_SCALE = ("ls_1.gamma", "ls_2.gamma")
_TIMM_BLOCK = (
    (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.qkv.{}", "cat"),
    (("norm1",), "norm1.{}", "same"),
    (("attn.out_proj",), "attn.proj.{}", "same"),
    (("norm2",), "norm2.{}", "same"),
    (("mlp.fc1",), "mlp.fc1.{}", "same"),
    (("mlp.fc2",), "mlp.fc2.{}", "same"),
)
_TIMM_LAYER_SCALE = ("ls1.gamma", "ls2.gamma")
_TIMM_MAP = (
    (("attn.q_proj",), "q.{}", "same"),
    (("attn.k_proj", "attn.v_proj"), "kv.{}", "cat"),
    (("attn.out_proj",), "proj.{}", "same"),
    (("norm",), "norm.{}", "same"),
    (("mlp.fc1",), "mlp.fc1.{}", "same"),
    (("mlp.fc2",), "mlp.fc2.{}", "same"),
)
# Buffers, not weights: never "unread".
_BUFFERS = ("attn_mask", "position_ids")


@dataclass(frozen=True)
class Layout:
    """Where open_clip keeps each part: `timm_vision` (``visual.trunk.*``), `timm_head` ("trunk":
    ``visual.trunk.head``, "proj": ``visual.head.proj``, "none"), `custom_text` (``text.*``)."""

    timm_vision: bool
    timm_head: str
    custom_text: bool

    @classmethod
    def of_keys(cls, keys: Any) -> "Layout":
        """The layout a state dict's key names show."""
        keys = set(keys)
        head = "trunk" if "visual.trunk.head.weight" in keys else "proj" if "visual.head.proj.weight" in keys else "none"
        return cls(any(k.startswith("visual.trunk.") for k in keys), head, "text.token_embedding.weight" in keys)

    @classmethod
    def for_config(cls, config: CLIPConfig) -> "Layout":
        """The layout open_clip would use for this architecture: its own ViT where it can express it (a
        class token, no patch bias, a plain projection), else a timm trunk with the text tower under
        ``text.*``, as open_clip's SigLIP models have."""
        v = config.vision
        timm = not v.class_token or v.patch_bias or v.pool == "map" or v.proj != "linear"
        return cls(timm, "trunk" if timm and v.proj != "none" else "none", timm)


# ---- tables --------------------------------------------------------------------------------------
def _open_clip_vit_rows(v: VisionConfig) -> list[Row]:
    if v.proj != "linear" or v.pool == "map" or not v.class_token or v.patch_bias:
        raise ValueError(
            "open_clip's own VisionTransformer needs a class token, no patch bias, no attention pooling and a "
            f"plain projection; this config has class_token={v.class_token}, patch_bias={v.patch_bias}, "
            f"pool={v.pool!r}, proj={v.proj!r}"
        )
    rows: list[Row] = [
        (("visual.patch_embed.proj.weight",), "visual.conv1.weight", "same"),
        (("visual.class_token",), "visual.class_embedding", "same"),
        (("visual.pos_embed",), "visual.positional_embedding", "same"),
        *norm_rows("visual.norm", "visual.ln_post"),
        (("visual.proj.weight",), "visual.proj", "T"),
    ]
    if v.norm_pre:
        rows += norm_rows("visual.norm_pre", "visual.ln_pre")
    ls = _OC_LAYER_SCALE if v.layer_scale is not None else None
    return rows + stack_rows("visual.transformer.blocks.", "visual.transformer.resblocks.", v.depth, _OC_BLOCK, ls)


def _timm_vit_rows(v: VisionConfig, head: str) -> list[Row]:
    t = "visual.trunk."
    rows: list[Row] = [
        *linear_rows("visual.patch_embed.proj", t + "patch_embed.proj", v.patch_bias),
        (("visual.pos_embed",), t + "pos_embed", "squeeze1"),
        *norm_rows("visual.norm", t + ("fc_norm" if v.norm_after_pool else "norm")),
    ]
    if v.class_token:
        rows.append((("visual.class_token",), t + "cls_token", "squeeze2"))
    if v.norm_pre:
        rows += norm_rows("visual.norm_pre", t + "norm_pre")
    ls = _TIMM_LAYER_SCALE if v.layer_scale is not None else None
    rows += stack_rows("visual.transformer.blocks.", f"{t}blocks.", v.depth, _TIMM_BLOCK, ls)
    if v.pool == "map":
        rows.append((("visual.attn_pool.probe",), t + "attn_pool.latent", "squeeze1"))
        rows += block_rows("visual.attn_pool.", t + "attn_pool.", _TIMM_MAP, None)
    if v.proj != "none":
        rows += linear_rows("visual.proj", t + "head" if head == "trunk" else "visual.head.proj", v.proj == "linear_bias")
    return rows


def _text_rows(t: TextConfig, custom: bool) -> list[Row]:
    p = "text." if custom else ""
    rows: list[Row] = [
        (("text.token_embed.weight",), p + "token_embedding.weight", "same"),
        (("text.pos_embed",), p + "positional_embedding", "same"),
        *norm_rows("text.norm", p + "ln_final"),
    ]
    if t.proj == "linear":
        rows.append((("text.proj.weight",), p + "text_projection", "T"))
    elif t.proj == "linear_bias":
        rows += linear_rows("text.proj", p + "text_projection", True)
    ls = _OC_LAYER_SCALE if t.layer_scale is not None else None
    return rows + stack_rows("text.transformer.blocks.", f"{p}transformer.resblocks.", t.depth, _OC_BLOCK, ls)


def _table(config: CLIPConfig, layout: Layout, has_bias: bool) -> list[Row]:
    vision = _timm_vit_rows(config.vision, layout.timm_head) if layout.timm_vision else _open_clip_vit_rows(config.vision)
    rows = [*vision, *_text_rows(config.text, layout.custom_text), (("logit_scale",), "logit_scale", "same")]
    if has_bias:
        rows.append((("logit_bias",), "logit_bias", "same"))
    return rows


def open_clip_state_dict_to_vlm(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """An open_clip `CLIP` / `CustomTextCLIP` state dict -> vlm keys, for the architecture `config` describes.

    ValueError when keys the table expects are missing, or when the state dict holds parameters vlm's model
    has no place for (a feature of another architecture).
    """
    table = _table(config, Layout.of_keys(state), "logit_bias" in state)
    extra = unread_keys(table, state, _BUFFERS)
    if extra:
        raise ValueError(
            f"the open_clip state dict has {len(extra)} parameter(s) this config has no place for, e.g. {extra[:4]}; "
            "is the config right for these weights (layer scale, attention pooling, projection bias)?"
        )
    return to_vlm(table, state, "open_clip")


def vlm_state_dict_to_open_clip(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A vlm state dict -> open_clip keys in the layout open_clip uses for this architecture; the inverse
    of `open_clip_state_dict_to_vlm`."""
    return from_vlm(_table(config, Layout.for_config(config), "logit_bias" in state), state)


# ---- open_clip modules ---------------------------------------------------------------------------
def from_open_clip(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    config: CLIPConfig | None = None,
    *,
    model_name: str | None = None,
) -> CLIP:
    """A vlm `CLIP` with the weights of an open_clip ViT model (CLIP, SigLIP, SigLIP 2, CLIPA, MetaCLIP 2, ...)
    or of its state dict.

    A module carries its architecture; a bare state dict needs `config` (e.g. ``vlm.get_preset("ViT-B-32")``).
    `model_name` is the open_clip name the module was created from (``"ViT-B-16-SigLIP"``, ``"hf-hub:..."``,
    ``"local-dir:..."``): its model config names the tokenizer and the preprocessing. A module whose text
    tower does not use CLIP's vocabulary needs it, since the module itself does not record its tokenizer.
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = config or config_from_open_clip(model_or_state_dict, open_clip_model_config(model_name))
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        if config is None:
            raise ValueError(
                "from_open_clip got a bare state dict and no config: pass config=vlm.get_preset('ViT-B-32') "
                "(or the CLIPConfig these weights were trained with)"
            )
        state = model_or_state_dict
    else:
        raise TypeError(f"from_open_clip takes an open_clip CLIP module or a state dict, got {type(model_or_state_dict).__name__}")
    return model_from_state(config, open_clip_state_dict_to_vlm(state, config))


def to_open_clip(model: CLIP) -> nn.Module:
    """An open_clip module with this model's weights, of the class and layout open_clip uses for this
    architecture (`CLIP` with its own ViT, or `CustomTextCLIP` with a timm trunk for SigLIP-style towers),
    with the preprocessing in `visual.preprocess_cfg`."""
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CustomTextCLIP

    config = model.config
    layout = Layout.for_config(config)
    v, t = config.vision, config.text
    quick_gelu = t.activation == "quick_gelu"
    if not layout.timm_vision and (v.activation == "quick_gelu") != quick_gelu:
        raise ValueError(
            f"open_clip uses QuickGELU in both towers or in neither; this model has {v.activation} (vision) and "
            f"{t.activation} (text)"
        )
    text_cfg = open_clip_text_cfg(t)
    common = dict(embed_dim=config.embed_dim, text_cfg=text_cfg, quick_gelu=quick_gelu,
                  init_logit_scale=config.init_logit_scale, init_logit_bias=config.init_logit_bias)
    if layout.timm_vision:
        # A one-block placeholder tower, replaced by the timm trunk built to this config below.
        oc = CustomTextCLIP(vision_cfg=dict(layers=1, width=64, head_width=64, patch_size=v.patch_size, image_size=v.image_size), **common)
        oc.visual = timm_tower(config)
    else:
        oc = OpenCLIP(vision_cfg=open_clip_vision_cfg(v), **common)
    state = vlm_state_dict_to_open_clip(model.state_dict(), config)
    oc = oc.to(device=model.logit_scale.device, dtype=model.logit_scale.dtype)
    oc.load_state_dict(state, strict=True)
    oc.visual.preprocess_cfg = {
        "size": v.image_size,
        "mode": "RGB",
        "mean": v.image_mean,
        "std": v.image_std,
        "interpolation": v.interpolation,
        "resize_mode": v.resize_mode,
        "fill_color": 0,
    }
    oc.visual.image_mean, oc.visual.image_std = v.image_mean, v.image_std
    return oc.eval() if not model.training else oc

