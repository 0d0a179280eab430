"""open_clip's models and state dicts, both ways.

open_clip stores the same architecture in three layouts, all read from key names alone:

- its own `VisionTransformer` under ``visual.*`` (OpenAI's CLIP, LAION's, CLIPA, MetaCLIP 2 worldwide), or a
  timm `VisionTransformer` trunk under ``visual.trunk.*`` (SigLIP, SigLIP 2, MobileCLIP 2 L/14), whose
  projection, if any, is timm's classifier ``visual.trunk.head`` or open_clip's ``visual.head.proj``;
- the text tower at the top level (`CLIP`: ``token_embedding``, ``transformer.*``) or under ``text.*``
  (`CustomTextCLIP`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..config import CLIP_TOKENIZER, OPENAI_MEAN, OPENAI_STD, CLIPConfig, TextConfig, VisionConfig
from ..model import CLIP
from .tables import Row, block_rows, from_vlm, linear_rows, model_from_state, norm_rows, stack_rows, to_vlm, unread_keys

__all__ = [
    "config_from_open_clip",
    "from_open_clip",
    "open_clip_model_config",
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


# ---- reading an open_clip module -----------------------------------------------------------------
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


def open_clip_model_config(name: str | None) -> dict[str, Any] | None:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, and ``preprocess_cfg`` when
    the source has one) for a built-in name, a ``local-dir:`` directory or a cached ``hf-hub:`` repo; None
    for None. Imports open_clip when called."""
    if name is None:
        return None
    if name.startswith("local-dir:"):
        data = json.loads((Path(name[len("local-dir:") :]) / "open_clip_config.json").read_text())
        return {**data["model_cfg"], "preprocess_cfg": data.get("preprocess_cfg", {})}
    import open_clip

    if name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        data = _get_hf_config(name[len("hf-hub:") :])
        return {**data["model_cfg"], "preprocess_cfg": data.get("preprocess_cfg", {})}
    return open_clip.get_model_config(name)


def config_from_open_clip(oc_model: nn.Module, model_cfg: Mapping[str, Any] | None = None) -> CLIPConfig:
    """The CLIPConfig of an open_clip ViT model; ValueError naming what vlm does not implement otherwise.

    `model_cfg` is open_clip's model config for it (`open_clip_model_config`): the tokenizer comes from its
    ``text_cfg``. Without it, a text tower with CLIP's vocabulary size gets CLIP's tokenizer, and any
    other raises ValueError asking for the model's name.
    """
    unsupported = _unsupported(oc_model)
    if unsupported:
        raise ValueError(
            f"this open_clip model uses {', '.join(unsupported)}, which vlm's CLIP does not implement; "
            "supported are ViT image towers (open_clip's own or timm's VisionTransformer: CLIP, SigLIP, SigLIP 2, "
            "CLIPA, MetaCLIP 2, ...) with open_clip's text transformer"
        )
    visual = oc_model.visual
    vision = _timm_vision_config(visual) if hasattr(visual, "trunk") else _vit_vision_config(visual)
    text = _text_config(oc_model, None if model_cfg is None else model_cfg.get("text_cfg") or {})
    # The initial values only matter for training from scratch; the module's current values are
    # trained weights, so the config records open_clip's defaults (CLIP's, or SigLIP's with a bias).
    sigmoid = getattr(oc_model, "logit_bias", None) is not None
    embed_dim = _embed_dim(oc_model, vision)
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        init_logit_scale=math.log(10.0) if sigmoid else CLIPConfig.init_logit_scale,
        init_logit_bias=-10.0 if sigmoid else None,
    )


def _embed_dim(oc_model: nn.Module, vision: VisionConfig) -> int:
    visual = oc_model.visual
    if vision.proj == "none":
        return vision.width
    if isinstance(getattr(visual, "proj", None), nn.Parameter):
        return visual.proj.shape[1]
    head = getattr(visual.trunk, "head", None)
    if isinstance(head, nn.Linear):
        return head.out_features
    return visual.head.proj.out_features


def _preprocess(visual: nn.Module) -> dict[str, Any]:
    pp = dict(getattr(visual, "preprocess_cfg", None) or {})
    return dict(
        image_mean=tuple(pp.get("mean") or getattr(visual, "image_mean", None) or OPENAI_MEAN),
        image_std=tuple(pp.get("std") or getattr(visual, "image_std", None) or OPENAI_STD),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
    )


def _vit_vision_config(visual: nn.Module) -> VisionConfig:
    block = visual.transformer.resblocks[0]
    width = visual.conv1.out_channels
    return VisionConfig(
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        width=width,
        depth=len(visual.transformer.resblocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        activation=_activation(block.mlp.gelu),
        norm_eps=visual.ln_post.eps,
        norm_pre=not isinstance(visual.ln_pre, nn.Identity),
        pool={"tok": "token", "avg": "avg", "none": "none"}[visual.pool_type],
        norm_after_pool=bool(visual.final_ln_after_pool),
        layer_scale=_layer_scale(block.ls_1),
        **_preprocess(visual),
    )


def _timm_vision_config(visual: nn.Module) -> VisionConfig:
    trunk = visual.trunk
    block = trunk.blocks[0]
    pool = "map" if trunk.attn_pool is not None else trunk.global_pool
    if isinstance(getattr(trunk, "head", None), nn.Linear):
        proj = "linear_bias"
    elif hasattr(getattr(visual, "head", None), "proj"):
        proj = "linear_bias" if visual.head.proj.bias is not None else "linear"
    else:
        proj = "none"
    return VisionConfig(
        image_size=trunk.patch_embed.img_size[0],
        patch_size=trunk.patch_embed.patch_size[0],
        width=trunk.embed_dim,
        depth=len(trunk.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / trunk.embed_dim,
        activation=_activation(block.mlp.act),
        norm_eps=block.norm1.eps,
        class_token=trunk.cls_token is not None,
        patch_bias=trunk.patch_embed.proj.bias is not None,
        norm_pre=not isinstance(trunk.norm_pre, nn.Identity),
        pool=pool,
        norm_after_pool=not isinstance(trunk.fc_norm, nn.Identity),
        proj=proj,
        layer_scale=_layer_scale(block.ls1),
        **_preprocess(visual),
    )


def _text_module(oc_model: nn.Module) -> tuple[nn.Module, str, int | None]:
    """The module holding the text tower's parts, its pool type and its end-of-text id."""
    text = getattr(oc_model, "text", None)
    if text is not None and hasattr(text, "token_embedding"):
        return text, text.pool_type, getattr(text, "eos_id", None)
    return oc_model, oc_model.text_pool_type, getattr(oc_model, "text_eos_id", None)


def _text_config(oc_model: nn.Module, text_cfg: Mapping[str, Any] | None) -> TextConfig:
    text, pool_type, eos_id = _text_module(oc_model)
    block = text.transformer.resblocks[0]
    width = text.token_embedding.embedding_dim
    projection = text.text_projection
    proj = "none" if projection is None else "linear_bias" if isinstance(projection, nn.Linear) else "linear"
    vocab_size = text.token_embedding.num_embeddings
    return TextConfig(
        context_length=text.positional_embedding.shape[0],
        vocab_size=vocab_size,
        width=width,
        depth=len(text.transformer.resblocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        activation=_activation(block.mlp.gelu),
        norm_eps=text.ln_final.eps,
        causal=text.attn_mask is not None,
        pool={"argmax": "eot", "eos": "eot"}.get(pool_type, pool_type),
        eot_id=eos_id if pool_type == "eos" else None,
        pad_id=int((text_cfg or {}).get("pad_id", getattr(text, "pad_id", 0))),
        proj=proj,
        layer_scale=_layer_scale(block.ls_1),
        **_tokenizer_fields(text_cfg, vocab_size),
    )


def _tokenizer_fields(text_cfg: Mapping[str, Any] | None, vocab_size: int) -> dict[str, Any]:
    name = (text_cfg or {}).get("hf_tokenizer_name")
    if not name:
        if text_cfg is None and vocab_size != TextConfig.vocab_size:
            raise ValueError(
                f"this open_clip model's text tower has {vocab_size} tokens, not CLIP's {TextConfig.vocab_size}, and "
                "open_clip modules do not record their tokenizer: pass the open_clip name the model was created "
                "from, vlm.from_open_clip(model, model_name='ViT-B-16-SigLIP') (or 'local-dir:...', 'hf-hub:...')"
            )
        return dict(tokenizer=CLIP_TOKENIZER)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    return dict(
        tokenizer=name,
        tokenizer_clean=kwargs.get("clean", "whitespace"),
        strip_sep_token=bool(kwargs.get("strip_sep_token", False)),
    )


def _layer_scale(module: nn.Module) -> float | None:
    # The initial value is not recoverable from trained weights; it only matters when training from scratch.
    return None if isinstance(module, nn.Identity) else 1e-5


def _activation(act: nn.Module) -> str:
    name = type(act).__name__
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
    # timm's own classes: GELU (exact), GELUTanh, QuickGELU (open_clip's and timm's share the name).
    known = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}
    if name in known:
        return known[name]
    raise ValueError(f"unsupported open_clip activation {name}; vlm implements GELU (exact or tanh) and QuickGELU")


def _unsupported(oc_model: nn.Module) -> list[str]:
    visual = getattr(oc_model, "visual", None)
    text = getattr(oc_model, "text", None)
    if text is not None and not hasattr(text, "token_embedding"):
        return [f"a custom text tower ({type(text).__name__})"]
    if text is None and not hasattr(oc_model, "token_embedding"):
        return ["a text tower vlm does not know"]
    if visual is None:
        return ["no image tower"]
    found = _timm_unsupported(visual) if hasattr(visual, "trunk") else _vit_unsupported(visual)
    text_module = _text_module(oc_model)[0]
    if getattr(text_module, "cls_emb", None) is not None:
        found.append("a text class token (CoCa)")
    if getattr(text_module, "use_pad_mask", False):
        found.append("a text padding mask")
    if isinstance(text_module.text_projection, nn.Linear) and text_module.text_projection.bias is None:
        found.append("a text projection Linear without bias")
    found += _blocks_unsupported(text_module.transformer.resblocks, "text")
    return found


def _vit_unsupported(visual: nn.Module) -> list[str]:
    if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
        return [f"a non-ViT image tower ({type(visual).__name__})"]
    found = []
    if getattr(visual, "attn_pool", None) is not None:
        found.append("an attentional pooler (CoCa)")
    if not isinstance(getattr(visual, "proj", None), nn.Parameter):
        found.append("an image tower without projection")
    if type(visual.patch_dropout).__name__ != "Identity" and getattr(visual.patch_dropout, "prob", 0) > 0:
        found.append("patch dropout")
    return found + _blocks_unsupported(visual.transformer.resblocks, "image")


def _blocks_unsupported(blocks: nn.ModuleList, tower: str) -> list[str]:
    for block in blocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            return [f"custom attention blocks in the {tower} tower (qk-norm, scaled cosine attention, ...)"]
        if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            return [f"extra LayerNorms in the {tower} tower's blocks"]
    return []


def _timm_unsupported(visual: nn.Module) -> list[str]:
    trunk = visual.trunk
    if type(trunk).__name__ != "VisionTransformer":
        return [f"a timm {type(trunk).__name__} image tower (vlm implements timm's VisionTransformer)"]
    found = []
    if getattr(trunk, "reg_token", None) is not None:
        found.append("register tokens")
    if trunk.cls_token is not None and getattr(trunk, "no_embed_class", False):
        found.append("position embeddings that skip the class token")
    if trunk.attn_pool is None and trunk.global_pool not in ("token", "avg"):
        found.append(f"timm pooling {trunk.global_pool!r}")
    pool = trunk.attn_pool
    if pool is not None and (type(pool).__name__ != "AttentionPoolLatent" or pool.latent_len != 1 or pool.pos_embed is not None):
        found.append(f"attention pooling {type(pool).__name__} other than SigLIP's MAP head")
    if type(trunk.patch_embed).__name__ != "PatchEmbed":
        found.append(f"a convolutional stem ({type(trunk.patch_embed).__name__})")
    elif not isinstance(trunk.patch_embed.norm, nn.Identity):
        found.append("a normalised patch embedding")
    head = getattr(visual, "head", None)
    if head is not None and any(name not in ("drop", "proj") for name, _ in head.named_children()):
        found.append("an MLP or attention-pool image projection")
    for block in trunk.blocks:
        attn, mlp = block.attn, block.mlp
        if type(block).__name__ != "Block" or type(attn).__name__ != "Attention" or type(mlp).__name__ != "Mlp":
            found.append(f"timm {type(block).__name__} blocks with {type(attn).__name__} and {type(mlp).__name__}")
            break
        extras = [m for m in (attn.q_norm, attn.k_norm, getattr(attn, "norm", nn.Identity()), mlp.norm) if not isinstance(m, nn.Identity)]
        if extras:
            found.append("qk-norm or extra LayerNorms in the image tower's blocks")
            break
    return found


# ---- writing an open_clip module -----------------------------------------------------------------
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
    text_cfg = _open_clip_text_cfg(t)
    common = dict(embed_dim=config.embed_dim, text_cfg=text_cfg, quick_gelu=quick_gelu,
                  init_logit_scale=config.init_logit_scale, init_logit_bias=config.init_logit_bias)
    if layout.timm_vision:
        # A one-block placeholder tower, replaced by the timm trunk built to this config below.
        oc = CustomTextCLIP(vision_cfg=dict(layers=1, width=64, head_width=64, patch_size=v.patch_size, image_size=v.image_size), **common)
        oc.visual = _timm_tower(config)
    else:
        oc = OpenCLIP(vision_cfg=_open_clip_vision_cfg(v), **common)
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


def _act_kwargs(activation: str) -> dict[str, Any] | None:
    return {"approximate": "tanh"} if activation == "gelu_tanh" else None


def _open_clip_vision_cfg(v: VisionConfig) -> dict[str, Any]:
    return dict(
        layers=v.depth,
        width=v.width,
        head_width=v.width // v.num_heads,
        mlp_ratio=v.mlp_ratio,
        patch_size=v.patch_size,
        image_size=v.image_size,
        ls_init_value=v.layer_scale,
        no_ln_pre=not v.norm_pre,
        pool_type={"token": "tok", "avg": "avg", "none": "none"}[v.pool],
        final_ln_after_pool=v.norm_after_pool,
        act_kwargs=_act_kwargs(v.activation),
        norm_kwargs={"eps": v.norm_eps},
    )


def _open_clip_text_cfg(t: TextConfig) -> dict[str, Any]:
    pool = t.pool if t.pool != "eot" else ("argmax" if t.eot_id is None else "eos")
    cfg = dict(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.num_heads,
        layers=t.depth,
        mlp_ratio=t.mlp_ratio,
        ls_init_value=t.layer_scale,
        no_causal_mask=not t.causal,
        pool_type=pool,
        proj_bias=t.proj == "linear_bias",
        proj_type="none" if t.proj == "none" else "linear",
        pad_id=t.pad_id,
        act_kwargs=_act_kwargs(t.activation),
        norm_kwargs={"eps": t.norm_eps},
    )
    if t.eot_id is not None:
        cfg["eos_id"] = t.eot_id
    return cfg


def _timm_tower(config: CLIPConfig) -> nn.Module:
    """open_clip's `TimmModel` around a timm `VisionTransformer` of this config."""
    from open_clip.timm_model import TimmModel
    from timm.layers import get_act_layer
    from timm.models.vision_transformer import VisionTransformer

    v = config.vision
    if v.patch_bias == v.norm_pre:
        raise ValueError(
            "timm's VisionTransformer has a patch-embedding bias exactly when it has no pre-LayerNorm; this config "
            f"has patch_bias={v.patch_bias} and norm_pre={v.norm_pre}, which open_clip cannot hold"
        )
    trunk = VisionTransformer(
        img_size=v.image_size,
        patch_size=v.patch_size,
        embed_dim=v.width,
        depth=v.depth,
        num_heads=v.num_heads,
        mlp_ratio=v.mlp_ratio,
        class_token=v.class_token,
        global_pool=v.pool if v.pool != "none" else "",
        fc_norm=v.norm_after_pool,
        pre_norm=v.norm_pre,
        init_values=v.layer_scale,
        act_layer=get_act_layer({"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}[v.activation]),
        norm_layer=partial(nn.LayerNorm, eps=v.norm_eps),
        num_classes=config.embed_dim if v.proj != "none" else 0,
    )
    if v.proj == "linear":
        trunk.head = nn.Linear(v.width, config.embed_dim, bias=False)
    tower = TimmModel.__new__(TimmModel)
    nn.Module.__init__(tower)
    tower.image_size = (v.image_size, v.image_size)
    tower.trunk = trunk
    tower.head = nn.Sequential()
    return tower
