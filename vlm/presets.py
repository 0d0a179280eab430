"""Named model configs: one table of open_clip's architectures (CLIP, SigLIP, SigLIP 2, CLIPA, MetaCLIP 2
worldwide) and small presets for tests and demos."""

from __future__ import annotations

import math
from typing import Any

from .config import (
    CLIP_TOKENIZER,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    CLIPConfig,
    TextConfig,
    VisionConfig,
)

__all__ = ["PRESETS", "get_preset", "list_presets"]


def _clip(embed_dim: int, vision: dict[str, Any], text: dict[str, Any], **kw: Any) -> CLIPConfig:
    return CLIPConfig(embed_dim=embed_dim, vision=VisionConfig(**vision), text=TextConfig(**text), **kw)


_B_TEXT = dict(width=512, depth=12, num_heads=8)
_L_TEXT = dict(width=768, depth=12, num_heads=12)
_QG = dict(activation="quick_gelu")

# ---- SigLIP and SigLIP 2 (open_clip: a timm ViT trunk; transformers: SiglipModel) -----------------------
# No class token, a patch bias, no pre-LayerNorm, the MAP head's output as the embedding; bidirectional text
# read at the last position (where the padding has seen the whole text), projected with a bias.
_SIGLIP_VISION = dict(
    class_token=False, patch_bias=True, norm_pre=False, pool="map", proj="none", norm_eps=1e-6,
    image_mean=INCEPTION_MEAN, image_std=INCEPTION_STD, resize_mode="squash",
)
_SIGLIP_TEXT = dict(causal=False, pool="last", norm_eps=1e-6, tokenizer_clean="canonicalize")
_SIGLIP_B = dict(width=768, depth=12, num_heads=12)
_SIGLIP_L = dict(width=1024, depth=24, num_heads=16)
# Shape-optimised 400M: timm's int(1152 * 3.7362) = 4304 MLP channels.
_SIGLIP_SO = dict(width=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152)
_SIGLIP_G = dict(width=1536, depth=40, num_heads=16)
_T5_32K = dict(vocab_size=32000, tokenizer="timm/ViT-B-16-SigLIP")
_MC4_250K = dict(vocab_size=250000, tokenizer="timm/ViT-B-16-SigLIP-i18n-256")


def _siglip(
    image_size: int, patch_size: int, shape: dict[str, Any], text: dict[str, Any], *,
    vision_act: str = "gelu", text_act: str = "gelu", text_shape: dict[str, Any] | None = None, **text_kw: Any,
) -> CLIPConfig:
    vision = VisionConfig(image_size=image_size, patch_size=patch_size, activation=vision_act, **shape, **_SIGLIP_VISION)
    text_cfg = dict(context_length=64, proj="linear_bias", activation=text_act, **_SIGLIP_TEXT, **(text_shape or shape))
    text_cfg.update(text, **text_kw)
    return CLIPConfig(
        embed_dim=shape["width"], vision=vision, text=TextConfig(**text_cfg),
        init_logit_scale=math.log(10.0), init_logit_bias=-10.0,
    )


def _siglip2(image_size: int, patch_size: int, shape: dict[str, Any], repo: str, **kw: Any) -> CLIPConfig:
    # SigLIP 2 shares the Gemma vocabulary; open_clip points each model at its own copy on the hub.
    return _siglip(image_size, patch_size, shape, dict(vocab_size=256000, tokenizer=repo), text_act="gelu_tanh", **kw)


# ---- CLIPA (open_clip's own ViT) ---------------------------------------------------------------------
# The patch tokens' mean, LayerNorm after pooling, no pre-LayerNorm; bidirectional BERT-vocabulary text read
# at the last position, its [SEP] ids zeroed (open_clip's strip_sep_token).
_CLIPA_VISION = dict(
    patch_size=14, norm_pre=False, pool="avg", norm_after_pool=True,
    image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, interpolation="bilinear", resize_mode="squash",
)
_CLIPA_TEXT = dict(
    context_length=32, vocab_size=32000, causal=False, pool="last",
    tokenizer="bert-base-uncased", tokenizer_clean="whitespace", strip_sep_token=True,
)
_H_VISION = dict(width=1280, depth=32, num_heads=16)
_H_TEXT = dict(width=1024, depth=24, num_heads=16)
_BIGG_VISION = dict(width=1664, depth=48, num_heads=16, mlp_ratio=8192 / 1664)
_BIGG_TEXT = dict(width=1280, depth=32, num_heads=20)


def _clipa(embed_dim: int, image_size: int, vision: dict[str, Any], text: dict[str, Any]) -> CLIPConfig:
    return _clip(embed_dim, dict(image_size=image_size, **vision, **_CLIPA_VISION), dict(**text, **_CLIPA_TEXT))


# ---- MetaCLIP 2 worldwide (open_clip's own ViT; transformers: MetaClip2Model) ---------------------------
# CLIP's towers; multilingual XLM-V vocabulary, pooled at its first end-of-text id (2).
_WORLDWIDE_TEXT = dict(vocab_size=901629, eot_id=2, tokenizer="facebook/xlm-v-base", tokenizer_clean="whitespace")


def _worldwide(embed_dim: int, image_size: int, vision: dict[str, Any], text: dict[str, Any], **act: Any) -> CLIPConfig:
    resize = dict(resize_mode="squash") if image_size != 224 else {}
    return _clip(
        embed_dim, dict(image_size=image_size, patch_size=14, **vision, **resize, **act), dict(**text, **_WORLDWIDE_TEXT, **act)
    )


# One table: open_clip's names and shapes (vision heads = width // 64 as in open_clip, or the model's
# head_width), with the preprocessing of the models' released weights, plus small presets for tests and
# demos. `-quickgelu` variants match OpenAI's original weights and HF's CLIPModel.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": _clip(512, dict(patch_size=32, width=768, depth=12, num_heads=12), _B_TEXT),
    "ViT-B-16": _clip(512, dict(patch_size=16, width=768, depth=12, num_heads=12), _B_TEXT),
    "ViT-L-14": _clip(768, dict(patch_size=14, width=1024, depth=24, num_heads=16), _L_TEXT),
    "ViT-B-32-quickgelu": _clip(512, dict(patch_size=32, width=768, depth=12, num_heads=12, **_QG), dict(_B_TEXT, **_QG)),
    "ViT-B-16-quickgelu": _clip(512, dict(patch_size=16, width=768, depth=12, num_heads=12, **_QG), dict(_B_TEXT, **_QG)),
    "ViT-L-14-quickgelu": _clip(768, dict(patch_size=14, width=1024, depth=24, num_heads=16, **_QG), dict(_L_TEXT, **_QG)),
    # SigLIP
    "ViT-B-16-SigLIP": _siglip(224, 16, _SIGLIP_B, _T5_32K),
    "ViT-B-16-SigLIP-256": _siglip(256, 16, _SIGLIP_B, _T5_32K),
    "ViT-B-16-SigLIP-i18n-256": _siglip(256, 16, _SIGLIP_B, _MC4_250K),
    "ViT-B-16-SigLIP-384": _siglip(384, 16, _SIGLIP_B, _T5_32K),
    "ViT-B-16-SigLIP-512": _siglip(512, 16, _SIGLIP_B, _T5_32K),
    "ViT-L-16-SigLIP-256": _siglip(256, 16, _SIGLIP_L, _T5_32K),
    "ViT-L-16-SigLIP-384": _siglip(384, 16, _SIGLIP_L, _T5_32K),
    # The 224-pixel So400m reads 16 text tokens.
    "ViT-SO400M-14-SigLIP": _siglip(224, 14, _SIGLIP_SO, _T5_32K, context_length=16),
    "ViT-SO400M-14-SigLIP-378": _siglip(378, 14, _SIGLIP_SO, _T5_32K),
    # 384 is not a multiple of 14: the last 6 pixels of each side are dropped, as in timm and transformers.
    "ViT-SO400M-14-SigLIP-384": _siglip(384, 14, _SIGLIP_SO, _T5_32K),
    "ViT-SO400M-16-SigLIP-i18n-256": _siglip(256, 16, _SIGLIP_SO, _MC4_250K, vision_act="gelu_tanh", proj="none"),
    # SigLIP 2 (timm's B/16, L/16 at 256 and 384, So400m/14 use exact GELU in the image tower; the others tanh)
    "ViT-B-32-SigLIP2-256": _siglip2(256, 32, _SIGLIP_B, "timm/ViT-B-32-SigLIP2-256", vision_act="gelu_tanh"),
    "ViT-B-16-SigLIP2": _siglip2(224, 16, _SIGLIP_B, "timm/ViT-B-16-SigLIP2"),
    "ViT-B-16-SigLIP2-256": _siglip2(256, 16, _SIGLIP_B, "timm/ViT-B-16-SigLIP2-256"),
    "ViT-B-16-SigLIP2-384": _siglip2(384, 16, _SIGLIP_B, "timm/ViT-B-16-SigLIP2-384"),
    "ViT-B-16-SigLIP2-512": _siglip2(512, 16, _SIGLIP_B, "timm/ViT-B-16-SigLIP2-512"),
    "ViT-L-16-SigLIP2-256": _siglip2(256, 16, _SIGLIP_L, "timm/ViT-L-16-SigLIP2-256"),
    "ViT-L-16-SigLIP2-384": _siglip2(384, 16, _SIGLIP_L, "timm/ViT-L-16-SigLIP2-384"),
    "ViT-L-16-SigLIP2-512": _siglip2(512, 16, _SIGLIP_L, "timm/ViT-L-16-SigLIP2-512", vision_act="gelu_tanh"),
    "ViT-SO400M-14-SigLIP2": _siglip2(224, 14, _SIGLIP_SO, "timm/ViT-SO400M-14-SigLIP2"),
    "ViT-SO400M-14-SigLIP2-378": _siglip2(378, 14, _SIGLIP_SO, "timm/ViT-SO400M-14-SigLIP2-378"),
    "ViT-SO400M-16-SigLIP2-256": _siglip2(256, 16, _SIGLIP_SO, "timm/ViT-SO400M-16-SigLIP2-256", vision_act="gelu_tanh"),
    "ViT-SO400M-16-SigLIP2-384": _siglip2(384, 16, _SIGLIP_SO, "timm/ViT-SO400M-16-SigLIP2-384", vision_act="gelu_tanh"),
    "ViT-SO400M-16-SigLIP2-512": _siglip2(512, 16, _SIGLIP_SO, "timm/ViT-SO400M-16-SigLIP2-512", vision_act="gelu_tanh"),
    # giant-opt: a wider image tower than its So400m text tower, which projects up to 1536.
    "ViT-gopt-16-SigLIP2-256": _siglip2(256, 16, _SIGLIP_G, "timm/ViT-gopt-16-SigLIP2-256", vision_act="gelu_tanh", text_shape=_SIGLIP_SO),
    "ViT-gopt-16-SigLIP2-384": _siglip2(384, 16, _SIGLIP_G, "timm/ViT-gopt-16-SigLIP2-384", vision_act="gelu_tanh", text_shape=_SIGLIP_SO),
    # CLIPA
    "ViT-L-14-CLIPA": _clipa(768, 224, dict(width=1024, depth=24, num_heads=16), _L_TEXT),
    "ViT-L-14-CLIPA-336": _clipa(768, 336, dict(width=1024, depth=24, num_heads=16), _L_TEXT),
    "ViT-H-14-CLIPA": _clipa(1024, 224, _H_VISION, _H_TEXT),
    "ViT-H-14-CLIPA-336": _clipa(1024, 336, _H_VISION, _H_TEXT),
    "ViT-bigG-14-CLIPA": _clipa(1280, 224, _BIGG_VISION, _BIGG_TEXT),
    "ViT-bigG-14-CLIPA-336": _clipa(1280, 336, _BIGG_VISION, _BIGG_TEXT),
    # MetaCLIP 2 worldwide (the ViT-H-14-worldwide weights were trained with QuickGELU: open_clip's tag says so)
    "ViT-H-14-worldwide": _worldwide(1024, 224, _H_VISION, _H_TEXT),
    "ViT-H-14-worldwide-quickgelu": _worldwide(1024, 224, _H_VISION, _H_TEXT, **_QG),
    "ViT-H-14-worldwide-378": _worldwide(1024, 378, _H_VISION, _H_TEXT),
    "ViT-bigG-14-worldwide": _worldwide(1280, 224, _BIGG_VISION, _BIGG_TEXT),
    "ViT-bigG-14-worldwide-378": _worldwide(1280, 378, _BIGG_VISION, _BIGG_TEXT),
    # Small presets: a forward and backward in well under a second on a 2-core CPU. The family variants keep
    # CLIP's byte-pair vocabulary so that they run without tokenizer files.
    "tiny": _clip(
        64,
        dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4),
        dict(context_length=32, width=64, depth=2, num_heads=4),
    ),
    "tiny-shared": _clip(
        64,
        dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4),
        dict(context_length=32, width=64, depth=2, num_heads=4),
        share_transformer=True,
    ),
    "tiny-siglip": _siglip(32, 8, dict(width=64, depth=2, num_heads=4), dict(context_length=32, tokenizer=CLIP_TOKENIZER, tokenizer_clean="lower"), text_act="gelu_tanh"),
    "tiny-clipa": _clip(
        64,
        dict(image_size=32, width=64, depth=2, num_heads=4, **dict(_CLIPA_VISION, patch_size=8)),
        dict(context_length=32, width=64, depth=2, num_heads=4, causal=False, pool="last"),
    ),
    "tiny-worldwide": _clip(
        64,
        dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4),
        dict(context_length=32, width=64, depth=2, num_heads=4, eot_id=49407),
    ),
    # Sized for 8x8-pixel digits upscaled to 32 and short captions: the demo's model.
    "small": _clip(
        128,
        dict(image_size=32, patch_size=4, width=128, depth=4, num_heads=4),
        dict(context_length=32, width=128, depth=4, num_heads=4),
    ),
}


def list_presets() -> list[str]:
    """The names `get_preset` and `create_model` accept, in table order."""
    return list(PRESETS)


def get_preset(name: str) -> CLIPConfig:
    """The preset's config; ValueError listing the known names for an unknown one."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
