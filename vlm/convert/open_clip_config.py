"""open_clip's architectures, both ways: the `CLIPConfig` of an open_clip module (refusing, by name, the
parts vlm does not implement), and the open_clip configs and timm trunk that `to_open_clip` builds from a
`CLIPConfig`. The weights are translated in `open_clip_format`."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..config import CLIP_TOKENIZER, OPENAI_MEAN, OPENAI_STD, CLIPConfig, TextConfig, VisionConfig

__all__ = [
    "config_from_open_clip",
    "open_clip_model_config",
    "open_clip_text_cfg",
    "open_clip_vision_cfg",
    "timm_tower",
]


# ---- reading an open_clip module's architecture ------------------------------------------------------
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
    # trained weights, so the config records the model config's, else open_clip's defaults (CLIP's, or
    # SigLIP's with a bias).
    sigmoid = getattr(oc_model, "logit_bias", None) is not None
    embed_dim = _embed_dim(oc_model, vision)
    init = model_cfg or {}
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        init_logit_scale=float(init.get("init_logit_scale", math.log(10.0) if sigmoid else CLIPConfig.init_logit_scale)),
        init_logit_bias=float(init.get("init_logit_bias", -10.0)) if sigmoid else None,
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
        patch_dropout=float(getattr(visual.patch_dropout, "prob", 0.0)),
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
        patch_dropout=float(getattr(trunk.patch_drop, "prob", 0.0)),
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



# ---- building an open_clip module's architecture ---------------------------------------------------
def _act_kwargs(activation: str) -> dict[str, Any] | None:
    return {"approximate": "tanh"} if activation == "gelu_tanh" else None


def open_clip_vision_cfg(v: VisionConfig) -> dict[str, Any]:
    """The ``vision_cfg`` of open_clip's own `VisionTransformer` for this image tower."""
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
        patch_dropout=v.patch_dropout,
        act_kwargs=_act_kwargs(v.activation),
        norm_kwargs={"eps": v.norm_eps},
    )


def open_clip_text_cfg(t: TextConfig) -> dict[str, Any]:
    """The ``text_cfg`` of open_clip's text transformer for this text tower."""
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


def timm_tower(config: CLIPConfig) -> nn.Module:
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
        patch_drop_rate=v.patch_dropout,
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
