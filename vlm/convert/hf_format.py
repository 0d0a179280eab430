"""transformers' CLIPModel, SiglipModel, Siglip2Model and MetaClip2Model, both ways.

The four share their key names (``vision_model.*``, ``text_model.*``); they differ in the towers' shape,
which vlm's config options express:

- CLIP and MetaCLIP 2: a class token, pre-LayerNorm, projections without bias, causal text pooled at the
  end-of-text token (CLIP: the highest id, MetaCLIP 2: the first `eos_token_id`);
- SigLIP: no class token, a patch bias, attention pooling (``head``) as the image embedding, bidirectional
  text pooled at the last position with a projection ``head`` with bias, and a ``logit_bias``;
- SigLIP 2 (NaFlex): SigLIP with the patch embedding as a Linear over flattened patches and the position
  embeddings resized with bilinear antialiasing. vlm runs it on one image size per batch, which is NaFlex
  whenever the image's patch grid fills the sequence (no padding patches).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from ..config import CLIP_TOKENIZER, OPENAI_MEAN, OPENAI_STD, CLIPConfig, TextConfig, VisionConfig
from ..model import CLIP
from .tables import Row, block_rows, from_vlm, linear_rows, model_from_state, norm_rows, stack_rows, to_vlm, unread_keys

__all__ = [
    "HF_FAMILIES",
    "config_from_hf",
    "from_hf",
    "hf_config_from_vlm",
    "hf_family",
    "hf_state_dict_to_vlm",
    "to_hf",
    "vlm_state_dict_to_hf",
]

logger = logging.getLogger(__name__)

# model_type -> the transformers class vlm reads and writes.
HF_FAMILIES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model", "metaclip_2": "MetaClip2Model"}
_SIGMOID = ("siglip", "siglip2")

_HF_BLOCK = (
    (("attn.q_proj",), "self_attn.q_proj.{}", "same"),
    (("attn.k_proj",), "self_attn.k_proj.{}", "same"),
    (("attn.v_proj",), "self_attn.v_proj.{}", "same"),
    (("norm1",), "layer_norm1.{}", "same"),
    (("attn.out_proj",), "self_attn.out_proj.{}", "same"),
    (("norm2",), "layer_norm2.{}", "same"),
    (("mlp.fc1",), "mlp.fc1.{}", "same"),
    (("mlp.fc2",), "mlp.fc2.{}", "same"),
)
_HF_MAP = (
    (("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attention.in_proj_{}", "cat"),
    (("attn.out_proj",), "attention.out_proj.{}", "same"),
    (("norm",), "layernorm.{}", "same"),
    (("mlp.fc1",), "mlp.fc1.{}", "same"),
    (("mlp.fc2",), "mlp.fc2.{}", "same"),
)
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}
# transformers' names for the same functions.
_FROM_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}


# ---- which transformers class a config is ---------------------------------------------------------
def hf_family(config: CLIPConfig) -> str:
    """The transformers model_type with this architecture ('clip', 'siglip', 'siglip2', 'metaclip_2');
    ValueError naming the options transformers has no class for."""
    v, t = config.vision, config.text
    siglip_vision = dict(class_token=False, patch_bias=True, norm_pre=False, pool="map", norm_after_pool=False, proj="none", layer_scale=None)
    siglip_text = dict(causal=False, pool="last", proj="linear_bias", layer_scale=None)
    clip_vision = dict(class_token=True, patch_bias=False, norm_pre=True, pool="token", norm_after_pool=False, proj="linear", layer_scale=None)
    clip_text = dict(causal=True, pool="eot", proj="linear", layer_scale=None)
    for vision, text, sigmoid in ((siglip_vision, siglip_text, True), (clip_vision, clip_text, False)):
        off = [f"vision.{k}={getattr(v, k)!r}" for k, want in vision.items() if getattr(v, k) != want]
        off += [f"text.{k}={getattr(t, k)!r}" for k, want in text.items() if getattr(t, k) != want]
        if off:
            continue
        if sigmoid != (config.init_logit_bias is not None):
            continue
        if sigmoid:
            return "siglip2" if v.pos_embed_resample == "bilinear_antialias" else "siglip"
        return "metaclip_2" if t.eot_id not in (None, t.vocab_size - 1) else "clip"
    raise ValueError(
        "transformers has no class for this architecture: CLIPModel / MetaClip2Model need CLIP's towers "
        f"({clip_vision} / {clip_text}, no logit_bias), SiglipModel / Siglip2Model need SigLIP's "
        f"({siglip_vision} / {siglip_text}, with logit_bias)"
    )


# ---- tables --------------------------------------------------------------------------------------
def _vision_rows(v: VisionConfig, family: str) -> list[Row]:
    e = "vision_model.embeddings."
    rows: list[Row] = [
        (("visual.pos_embed",), e + "position_embedding.weight", "same"),
        *norm_rows("visual.norm", "vision_model.post_layernorm"),
    ]
    if family == "siglip2":
        rows += [
            (("visual.patch_embed.proj.weight",), e + "patch_embedding.weight", "patch_linear"),
            (("visual.patch_embed.proj.bias",), e + "patch_embedding.bias", "same"),
        ]
    else:
        rows += linear_rows("visual.patch_embed.proj", e + "patch_embedding", v.patch_bias)
    if family in _SIGMOID:
        rows.append((("visual.attn_pool.probe",), "vision_model.head.probe", "squeeze1"))
        rows += block_rows("visual.attn_pool.", "vision_model.head.", _HF_MAP, None)
    else:
        rows += [
            (("visual.class_token",), e + "class_embedding", "same"),
            *norm_rows("visual.norm_pre", "vision_model.pre_layrnorm"),
            (("visual.proj.weight",), "visual_projection.weight", "same"),
        ]
    return rows + stack_rows("visual.transformer.blocks.", "vision_model.encoder.layers.", v.depth, _HF_BLOCK, None)


def _text_rows(t: TextConfig, family: str) -> list[Row]:
    e = "text_model.embeddings."
    rows: list[Row] = [
        (("text.token_embed.weight",), e + "token_embedding.weight", "same"),
        (("text.pos_embed",), e + "position_embedding.weight", "same"),
        *norm_rows("text.norm", "text_model.final_layer_norm"),
    ]
    if family in _SIGMOID:
        rows += linear_rows("text.proj", "text_model.head", True)
    else:
        rows.append((("text.proj.weight",), "text_projection.weight", "same"))
    return rows + stack_rows("text.transformer.blocks.", "text_model.encoder.layers.", t.depth, _HF_BLOCK, None)


def _table(config: CLIPConfig, family: str) -> list[Row]:
    rows = [*_vision_rows(config.vision, family), *_text_rows(config.text, family)]
    if family in _SIGMOID:
        rows += [(("logit_scale",), "logit_scale", "squeeze1"), (("logit_bias",), "logit_bias", "squeeze1")]
    else:
        rows.append((("logit_scale",), "logit_scale", "same"))
    return rows


def hf_state_dict_to_vlm(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A transformers state dict (CLIPModel, SiglipModel, Siglip2Model or MetaClip2Model, as `config`
    describes) -> vlm keys."""
    family = hf_family(config)
    table = _table(config, family)
    extra = unread_keys(table, state, ("position_ids",))
    if extra:
        raise ValueError(
            f"the transformers {HF_FAMILIES[family]} state dict has {len(extra)} parameter(s) this config has no "
            f"place for, e.g. {extra[:4]}; is the config right for these weights?"
        )
    return to_vlm(table, state, f"transformers {HF_FAMILIES[family]}")


def vlm_state_dict_to_hf(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A vlm state dict -> the keys of the transformers class `hf_family(config)` names; the inverse of
    `hf_state_dict_to_vlm`."""
    return from_vlm(_table(config, hf_family(config)), state)


# ---- reading transformers models -----------------------------------------------------------------
def config_from_hf(
    hf_config: Any, preprocessor: Mapping[str, Any] | None = None, *, tokenizer: str | None = None
) -> CLIPConfig:
    """The CLIPConfig of a transformers CLIPConfig / SiglipConfig / Siglip2Config / MetaClip2Config (and,
    optionally, its preprocessor_config.json). `tokenizer` names the tokenizer files (a directory or repo
    id) for the families that do not use CLIP's vocabulary; by default the config's ``_name_or_path``."""
    family = hf_config.model_type
    if family not in HF_FAMILIES:
        raise ValueError(f"transformers model_type {family!r} is not one vlm reads; supported: {', '.join(HF_FAMILIES)}")
    vc, tc = hf_config.vision_config, hf_config.text_config
    sigmoid = family in _SIGMOID
    vision = _vision_config(vc, family, dict(preprocessor or {}))
    text = _text_config(tc, family, tokenizer or getattr(hf_config, "_name_or_path", "") or None)
    if sigmoid:
        return CLIPConfig(embed_dim=vc.hidden_size, vision=vision, text=text, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    return CLIPConfig(
        embed_dim=hf_config.projection_dim, vision=vision, text=text, init_logit_scale=float(hf_config.logit_scale_init_value)
    )


def _vision_config(vc: Any, family: str, pre: dict[str, Any]) -> VisionConfig:
    siglip = family in _SIGMOID
    if family == "siglip2":
        # NaFlex: the position embeddings are a square grid of num_patches; the model's native size fills it.
        image_size = int(round(vc.num_patches**0.5)) * vc.patch_size
    else:
        image_size = vc.image_size
    size = pre.get("size") or {}
    resample = pre.get("resample")
    return VisionConfig(
        image_size=image_size,
        patch_size=vc.patch_size,
        width=vc.hidden_size,
        depth=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size / vc.hidden_size,
        activation=_activation(vc.hidden_act),
        norm_eps=vc.layer_norm_eps,
        image_mean=tuple(pre.get("image_mean") or ((0.5,) * 3 if siglip else OPENAI_MEAN)),
        image_std=tuple(pre.get("image_std") or ((0.5,) * 3 if siglip else OPENAI_STD)),
        interpolation={2: "bilinear", 3: "bicubic"}.get(resample, "bicubic"),
        # SigLIP's processors squash; a SigLIP model written with CLIP's processor (shortest_edge) crops.
        resize_mode="squash" if "height" in size or (siglip and "shortest_edge" not in size) else "shortest",
        class_token=not siglip,
        patch_bias=siglip,
        norm_pre=not siglip,
        pool="map" if siglip else "token",
        proj="none" if siglip else "linear",
        pos_embed_resample="bilinear_antialias" if family == "siglip2" else "bicubic",
    )


def _text_config(tc: Any, family: str, tokenizer: str | None) -> TextConfig:
    siglip = family in _SIGMOID
    eot_id = None
    # transformers' CLIP pools at the highest id when eos_token_id is 2 (its legacy configs), else at the
    # first eos_token_id, which for CLIP's vocabulary (end-of-text last) is the same position.
    if family == "metaclip_2" or (family == "clip" and tc.eos_token_id not in (2, tc.vocab_size - 1)):
        eot_id = tc.eos_token_id
        if not 0 <= eot_id < tc.vocab_size:
            raise ValueError(
                f"text_config.eos_token_id={eot_id} is outside the vocabulary ({tc.vocab_size} tokens): transformers "
                "would pool every text at position 0; fix eos_token_id in config.json"
            )
    if family == "clip":
        tokenizer_fields: dict[str, Any] = dict(tokenizer=CLIP_TOKENIZER)
    else:
        if not tokenizer:
            raise ValueError(
                f"this transformers {HF_FAMILIES[family]} does not say where it came from, so its tokenizer is unknown: "
                "pass tokenizer= (the repo id or directory of its tokenizer files, e.g. the repo it was trained as)"
            )
        tokenizer_fields = dict(tokenizer=tokenizer, tokenizer_clean="canonicalize" if siglip else "whitespace")
    return TextConfig(
        context_length=tc.max_position_embeddings,
        vocab_size=tc.vocab_size,
        width=tc.hidden_size,
        depth=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads,
        mlp_ratio=tc.intermediate_size / tc.hidden_size,
        activation=_activation(tc.hidden_act),
        norm_eps=tc.layer_norm_eps,
        causal=not siglip,
        pool="last" if siglip else "eot",
        eot_id=eot_id,
        pad_id=tc.pad_token_id if tc.pad_token_id is not None and 0 <= tc.pad_token_id < tc.vocab_size else 0,
        proj="linear_bias" if siglip else "linear",
        **tokenizer_fields,
    )


def _activation(name: str) -> str:
    if name in _FROM_HF_ACTIVATIONS:
        return _FROM_HF_ACTIVATIONS[name]
    raise ValueError(f"unsupported transformers hidden_act {name!r}; vlm implements {', '.join(_FROM_HF_ACTIVATIONS)}")


def from_hf(hf_model_or_dir: Any, *, local_files_only: bool | None = None, tokenizer: str | None = None) -> CLIP:
    """A vlm `CLIP` from a transformers CLIPModel, SiglipModel, Siglip2Model or MetaClip2Model, a directory
    saved by their `save_pretrained`, or a Hugging Face repo id (downloaded by transformers when online,
    read from its cache offline).

    The model's tokenizer (SigLIP, SigLIP 2, MetaCLIP 2) is `tokenizer` when given, else the directory or
    repo it was loaded from (a module's ``config._name_or_path``); a module of unknown origin needs it named.
    """
    preprocessor = None
    if isinstance(hf_model_or_dir, (str, Path)):
        hf_model, preprocessor, origin = _load_hf(hf_model_or_dir, local_files_only)
        tokenizer = tokenizer or origin
    else:
        hf_model = hf_model_or_dir
    name = type(hf_model).__name__
    if name not in HF_FAMILIES.values():
        raise TypeError(
            f"from_hf takes a transformers {', '.join(HF_FAMILIES.values())} (or its directory), got {name}"
        )
    config = config_from_hf(hf_model.config, preprocessor, tokenizer=tokenizer)
    return model_from_state(config, hf_state_dict_to_vlm(hf_model.state_dict(), config))


def _load_hf(name: str | Path, local_files_only: bool | None) -> tuple[Any, dict[str, Any] | None, str]:
    from transformers import AutoConfig, AutoModel

    path = Path(name)
    local = path.is_dir()
    if local_files_only is None:
        local_files_only = local
    if not local and path.exists():
        raise ValueError(f"{path} is a file; from_hf takes a directory holding config.json and the weights")
    try:
        hf_config = AutoConfig.from_pretrained(str(name), local_files_only=local_files_only)
        if hf_config.model_type not in HF_FAMILIES:
            raise ValueError(
                f"{name} holds a transformers {hf_config.model_type!r} model; vlm reads {', '.join(HF_FAMILIES)}"
            )
        hf_model = AutoModel.from_pretrained(str(name), local_files_only=local_files_only)
    except OSError as err:
        raise ValueError(
            f"could not load a transformers model from {str(name)!r} ({err}); give a directory written by "
            "save_pretrained, or a Hugging Face repo id while online"
        ) from err
    except pickle.UnpicklingError:  # transformers loads .bin weights with torch.load(weights_only=True)
        raise ValueError(
            f"{name} holds pickled weights that are not a plain state dict (refused unread: loading them "
            "could run code); get the model's safetensors weights, or re-save it from a trusted copy with "
            "save_pretrained(safe_serialization=True)"
        ) from None
    preprocessor = None
    if local and (path / "preprocessor_config.json").is_file():
        preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    return hf_model, preprocessor, str(path.resolve()) if local else str(name)


# ---- writing transformers models -----------------------------------------------------------------
def hf_config_from_vlm(config: CLIPConfig) -> Any:
    """A transformers config of the same architecture (the class `hf_family` names), for its model to load
    `vlm_state_dict_to_hf` weights into. Imports transformers when called."""
    import transformers

    family = hf_family(config)
    v, t = config.vision, config.text
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=t.mlp_width,
        num_hidden_layers=t.depth,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.context_length,
        hidden_act=_HF_ACTIVATIONS[t.activation],
        layer_norm_eps=t.norm_eps,
        pad_token_id=t.pad_id,
    )
    vision = dict(
        hidden_size=v.width,
        intermediate_size=v.mlp_width,
        num_hidden_layers=v.depth,
        num_attention_heads=v.num_heads,
        patch_size=v.patch_size,
        hidden_act=_HF_ACTIVATIONS[v.activation],
        layer_norm_eps=v.norm_eps,
    )
    if family in _SIGMOID:
        # SigLIP's vocabularies end texts with id 1 and have no start token.
        text.update(projection_size=config.embed_dim, bos_token_id=None, eos_token_id=t.eot_id if t.eot_id is not None else 1)
        if family == "siglip2":
            vision["num_patches"] = v.num_patches
        else:
            vision["image_size"] = v.image_size
        cls = transformers.Siglip2Config if family == "siglip2" else transformers.SiglipConfig
        return cls(text_config=text, vision_config=vision)
    # Pooling at the first end-of-text token: CLIP's is the highest id (49407), MetaCLIP 2's is eot_id.
    eos = t.eot_id if t.eot_id is not None else t.vocab_size - 1
    text.update(projection_dim=config.embed_dim, bos_token_id=max(eos - 1, 0), eos_token_id=eos)
    vision.update(image_size=v.image_size, projection_dim=config.embed_dim)
    cls = transformers.MetaClip2Config if family == "metaclip_2" else transformers.CLIPConfig
    return cls(
        text_config=text, vision_config=vision, projection_dim=config.embed_dim, logit_scale_init_value=config.init_logit_scale
    )


def to_hf(model: CLIP) -> nn.Module:
    """A transformers model with this model's weights: CLIPModel, MetaClip2Model, SiglipModel or Siglip2Model,
    whichever has this architecture (`hf_family`)."""
    import transformers

    config = model.config
    if config.init_logit_bias is None and model.logit_bias is not None:
        raise ValueError("this model has a logit_bias but its config does not; set init_logit_bias in the config")
    family = hf_family(config)
    cls = getattr(transformers, HF_FAMILIES[family])
    hf = cls(hf_config_from_vlm(config)).to(device=model.logit_scale.device, dtype=model.logit_scale.dtype)
    state = vlm_state_dict_to_hf(model.state_dict(), config)
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"internal: HF key table out of date: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return hf.eval() if not model.training else hf
