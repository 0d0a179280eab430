"""Converters between vlm's state dict and open_clip's / transformers', in both directions.

Every foreign key name lives in this module. A conversion is a table of rows (vlm keys, foreign key,
how): ``same`` copies, ``T`` transposes (open_clip keeps projections as ``x @ W`` matrices), ``qkv``
splits open_clip's fused ``in_proj`` into q/k/v (and concatenates them back). One table serves both
directions, so a round trip is exact.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import OPENAI_MEAN, OPENAI_STD, CLIPConfig, TextConfig, VisionConfig
from .model import CLIP

__all__ = [
    "from_open_clip",
    "to_open_clip",
    "from_hf",
    "to_hf",
    "open_clip_state_dict_to_vlm",
    "vlm_state_dict_to_open_clip",
    "hf_state_dict_to_vlm",
    "vlm_state_dict_to_hf",
    "detect_state_dict_format",
]

logger = logging.getLogger(__name__)

Row = tuple[tuple[str, ...], str, str]


# ---- tables ------------------------------------------------------------------------------------
def _block_rows(ours: str, theirs: str, names: Mapping[str, str], fused_qkv: bool) -> list[Row]:
    rows: list[Row] = []
    for suffix in ("weight", "bias"):
        if fused_qkv:
            qkv = tuple(f"{ours}attn.{p}_proj.{suffix}" for p in "qkv")
            rows.append((qkv, f"{theirs}{names['in_proj']}_{suffix}", "qkv"))
        else:
            rows += [((f"{ours}attn.{p}_proj.{suffix}",), f"{theirs}{names[p]}.{suffix}", "same") for p in "qkv"]
        for mine in ("norm1", "attn.out_proj", "norm2", "mlp.fc1", "mlp.fc2"):
            rows.append(((f"{ours}{mine}.{suffix}",), f"{theirs}{names[mine]}.{suffix}", "same"))
    return rows


_OC_BLOCK = {
    "in_proj": "attn.in_proj",
    "norm1": "ln_1",
    "attn.out_proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_BLOCK = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "norm1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _norm_rows(ours: str, theirs: str) -> list[Row]:
    return [((f"{ours}.{s}",), f"{theirs}.{s}", "same") for s in ("weight", "bias")]


def _open_clip_table(config: CLIPConfig, has_bias: bool) -> list[Row]:
    rows: list[Row] = [
        (("visual.patch_embed.proj.weight",), "visual.conv1.weight", "same"),
        (("visual.class_token",), "visual.class_embedding", "same"),
        (("visual.pos_embed",), "visual.positional_embedding", "same"),
        *_norm_rows("visual.norm_pre", "visual.ln_pre"),
        *_norm_rows("visual.norm", "visual.ln_post"),
        (("visual.proj.weight",), "visual.proj", "T"),
        (("text.token_embed.weight",), "token_embedding.weight", "same"),
        (("text.pos_embed",), "positional_embedding", "same"),
        *_norm_rows("text.norm", "ln_final"),
        (("text.proj.weight",), "text_projection", "T"),
        (("logit_scale",), "logit_scale", "same"),
    ]
    if has_bias:
        rows.append((("logit_bias",), "logit_bias", "same"))
    for i in range(config.vision.depth):
        rows += _block_rows(f"visual.transformer.blocks.{i}.", f"visual.transformer.resblocks.{i}.", _OC_BLOCK, True)
    for i in range(config.text.depth):
        rows += _block_rows(f"text.transformer.blocks.{i}.", f"transformer.resblocks.{i}.", _OC_BLOCK, True)
    return rows


def _hf_table(config: CLIPConfig) -> list[Row]:
    rows: list[Row] = [
        (("visual.patch_embed.proj.weight",), "vision_model.embeddings.patch_embedding.weight", "same"),
        (("visual.class_token",), "vision_model.embeddings.class_embedding", "same"),
        (("visual.pos_embed",), "vision_model.embeddings.position_embedding.weight", "same"),
        *_norm_rows("visual.norm_pre", "vision_model.pre_layrnorm"),
        *_norm_rows("visual.norm", "vision_model.post_layernorm"),
        (("visual.proj.weight",), "visual_projection.weight", "same"),
        (("text.token_embed.weight",), "text_model.embeddings.token_embedding.weight", "same"),
        (("text.pos_embed",), "text_model.embeddings.position_embedding.weight", "same"),
        *_norm_rows("text.norm", "text_model.final_layer_norm"),
        (("text.proj.weight",), "text_projection.weight", "same"),
        (("logit_scale",), "logit_scale", "same"),
    ]
    for i in range(config.vision.depth):
        rows += _block_rows(f"visual.transformer.blocks.{i}.", f"vision_model.encoder.layers.{i}.", _HF_BLOCK, False)
    for i in range(config.text.depth):
        rows += _block_rows(f"text.transformer.blocks.{i}.", f"text_model.encoder.layers.{i}.", _HF_BLOCK, False)
    return rows


# ---- applying a table --------------------------------------------------------------------------
def _to_vlm(table: list[Row], theirs: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    missing = [key for _, key, _ in table if key not in theirs]
    if missing:
        raise ValueError(
            f"the {source} state dict lacks {len(missing)} expected key(s), e.g. {missing[:3]}; "
            "is the config right for these weights (depth, architecture)?"
        )
    out: dict[str, Tensor] = {}
    for ours, key, how in table:
        value = theirs[key]
        if how == "qkv":
            out.update(zip(ours, value.chunk(3, dim=0)))
        else:
            out[ours[0]] = value.T if how == "T" else value
    return {k: v.contiguous() for k, v in out.items()}


def _from_vlm(table: list[Row], ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for keys, key, how in table:
        if how == "qkv":
            out[key] = torch.cat([ours[k] for k in keys], dim=0)
        else:
            out[key] = ours[keys[0]].T if how == "T" else ours[keys[0]]
    return {k: v.contiguous() for k, v in out.items()}


def _check_shared(config: CLIPConfig, state: Mapping[str, Tensor]) -> None:
    if not config.share_transformer:
        return
    for key, value in state.items():
        if key.startswith("visual.transformer."):
            other = state["text." + key[len("visual.") :]]
            if not torch.equal(value, other):
                raise ValueError(
                    f"config.share_transformer=True but the towers' Transformer weights differ (first at {key}); "
                    "load these weights with share_transformer=False"
                )


def open_clip_state_dict_to_vlm(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """An open_clip `CLIP` state dict -> vlm keys, for the architecture `config` describes."""
    out = _to_vlm(_open_clip_table(config, "logit_bias" in state), state, "open_clip")
    _check_shared(config, out)
    return out


def vlm_state_dict_to_open_clip(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A vlm state dict -> open_clip `CLIP` keys, the inverse of `open_clip_state_dict_to_vlm`."""
    return _from_vlm(_open_clip_table(config, "logit_bias" in state), state)


def hf_state_dict_to_vlm(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A transformers `CLIPModel` state dict -> vlm keys."""
    out = _to_vlm(_hf_table(config), state, "transformers CLIPModel")
    _check_shared(config, out)
    return out


def vlm_state_dict_to_hf(state: Mapping[str, Tensor], config: CLIPConfig) -> dict[str, Tensor]:
    """A vlm state dict -> transformers `CLIPModel` keys, the inverse of `hf_state_dict_to_vlm`."""
    return _from_vlm(_hf_table(config), state)


def detect_state_dict_format(state: Mapping[str, Any]) -> str:
    """'vlm', 'open_clip' or 'hf' from the key names; ValueError for anything else."""
    keys = set(state)
    if "visual.class_token" in keys or "text.token_embed.weight" in keys:
        return "vlm"
    if "visual.class_embedding" in keys and "token_embedding.weight" in keys:
        return "open_clip"
    if "vision_model.embeddings.class_embedding" in keys:
        return "hf"
    sample = sorted(keys)[:5]
    raise ValueError(
        f"unrecognised checkpoint: keys such as {sample} are neither vlm's, open_clip's ViT CLIP nor "
        "transformers' CLIPModel"
    )


def _load_into(model: CLIP, state: Mapping[str, Tensor]) -> CLIP:
    if model.config.share_transformer:
        state = {k: v for k, v in state.items() if not k.startswith("text.transformer.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (model.config.share_transformer and k.startswith("text.transformer."))]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


def _as_dtype(model: CLIP, like: Mapping[str, Tensor]) -> CLIP:
    dtype = like["logit_scale"].dtype if "logit_scale" in like else torch.float32
    return model.to(dtype)


# ---- open_clip ---------------------------------------------------------------------------------
def from_open_clip(model_or_state_dict: nn.Module | Mapping[str, Tensor], config: CLIPConfig | None = None) -> CLIP:
    """A vlm `CLIP` with the weights of an open_clip ViT `CLIP` module or state dict.

    A module carries its architecture; a bare state dict needs `config` (e.g. ``vlm.get_preset("ViT-B-32")``).
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = config or config_from_open_clip(model_or_state_dict)
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
    converted = open_clip_state_dict_to_vlm(state, config)
    model = CLIP(config, device="meta").to_empty(device=converted["logit_scale"].device)
    return _load_into(_as_dtype(model, converted), converted)


def config_from_open_clip(oc_model: nn.Module) -> CLIPConfig:
    """The CLIPConfig of an open_clip `CLIP` with a ViT image tower; ValueError for other variants."""
    visual = oc_model.visual
    unsupported = _open_clip_unsupported(oc_model)
    if unsupported:
        raise ValueError(
            f"this open_clip model uses {', '.join(unsupported)}, which vlm's CLIP does not implement; "
            "supported are the plain ViT CLIP models (ViT-B-32, ViT-B-16, ViT-L-14, their -quickgelu variants, ...)"
        )
    v_block, t_block = visual.transformer.resblocks[0], oc_model.transformer.resblocks[0]
    pp = dict(getattr(visual, "preprocess_cfg", None) or {})
    vision = VisionConfig(
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        width=visual.conv1.out_channels,
        depth=len(visual.transformer.resblocks),
        num_heads=v_block.attn.num_heads,
        mlp_ratio=v_block.mlp.c_fc.out_features / visual.conv1.out_channels,
        activation=_open_clip_activation(v_block),
        norm_eps=visual.ln_pre.eps,
        image_mean=tuple(pp.get("mean") or getattr(visual, "image_mean", None) or OPENAI_MEAN),
        image_std=tuple(pp.get("std") or getattr(visual, "image_std", None) or OPENAI_STD),
        interpolation=pp.get("interpolation", "bicubic"),
        resize_mode=pp.get("resize_mode", "shortest"),
    )
    width = oc_model.token_embedding.embedding_dim
    text = TextConfig(
        context_length=oc_model.positional_embedding.shape[0],
        vocab_size=oc_model.token_embedding.num_embeddings,
        width=width,
        depth=len(oc_model.transformer.resblocks),
        num_heads=t_block.attn.num_heads,
        mlp_ratio=t_block.mlp.c_fc.out_features / width,
        activation=_open_clip_activation(t_block),
        norm_eps=oc_model.ln_final.eps,
    )
    # The initial values only matter for training from scratch; the module's current values are
    # trained weights, so the config records open_clip's defaults (CLIP's, or SigLIP's with a bias).
    sigmoid = getattr(oc_model, "logit_bias", None) is not None
    return CLIPConfig(
        embed_dim=visual.proj.shape[1],
        vision=vision,
        text=text,
        init_logit_scale=math.log(10.0) if sigmoid else CLIPConfig.init_logit_scale,
        init_logit_bias=-10.0 if sigmoid else None,
    )


def _open_clip_unsupported(oc_model: nn.Module) -> list[str]:
    visual = getattr(oc_model, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
        return ["a non-ViT image tower"]
    if not hasattr(oc_model, "token_embedding"):
        return ["a custom text tower (CustomTextCLIP)"]
    found = []
    if getattr(visual, "attn_pool", None) is not None:
        found.append("an attentional pooler")
    if getattr(visual, "pool_type", "tok") != "tok":
        found.append(f"image pooling {visual.pool_type!r}")
    if getattr(visual, "final_ln_after_pool", False):
        found.append("final LayerNorm after pooling")
    if isinstance(visual.ln_pre, nn.Identity):
        found.append("no pre-LayerNorm")
    if not isinstance(getattr(visual, "proj", None), nn.Parameter):
        found.append("a non-linear image projection")
    if getattr(oc_model, "text_pool_type", "argmax") != "argmax":
        found.append(f"text pooling {oc_model.text_pool_type!r}")
    if not isinstance(getattr(oc_model, "text_projection", None), nn.Parameter):
        found.append("a text projection that is not a plain matrix")
    if getattr(oc_model, "attn_mask", None) is None:
        found.append("a text tower without causal mask")
    for block in [*visual.transformer.resblocks, *oc_model.transformer.resblocks]:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            found.append("custom attention blocks")
            break
        if not isinstance(block.ls_1, nn.Identity):
            found.append("layer scale")
            break
    return found


def _open_clip_activation(block: nn.Module) -> str:
    act = block.mlp.gelu
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(f"unsupported open_clip activation {name}; vlm implements GELU and QuickGELU")


def to_open_clip(model: CLIP) -> nn.Module:
    """An open_clip `CLIP` module with this model's weights (and preprocessing in `visual.preprocess_cfg`)."""
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    config = model.config
    v, t = config.vision, config.text
    if v.activation != t.activation:
        raise ValueError(
            f"open_clip uses one activation for both towers; this model has {v.activation} (vision) and "
            f"{t.activation} (text)"
        )
    if v.norm_eps != 1e-5 or t.norm_eps != 1e-5:
        raise ValueError(f"open_clip's CLIP uses LayerNorm eps 1e-5; this model has {v.norm_eps} / {t.norm_eps}")
    oc = OpenCLIP(
        embed_dim=config.embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=v.depth,
            width=v.width,
            head_width=v.width // v.num_heads,
            mlp_ratio=v.mlp_ratio,
            patch_size=v.patch_size,
            image_size=v.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=t.context_length,
            vocab_size=t.vocab_size,
            width=t.width,
            heads=t.num_heads,
            layers=t.depth,
            mlp_ratio=t.mlp_ratio,
        ),
        quick_gelu=v.activation == "quick_gelu",
        init_logit_scale=config.init_logit_scale,
        init_logit_bias=config.init_logit_bias,
    )
    state = vlm_state_dict_to_open_clip(model.state_dict(), config)
    dtype = model.logit_scale.dtype
    oc = oc.to(device=model.logit_scale.device, dtype=dtype)
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


# ---- transformers ------------------------------------------------------------------------------
def config_from_hf(hf_config: Any, preprocessor: Mapping[str, Any] | None = None) -> CLIPConfig:
    """The CLIPConfig of a transformers `CLIPConfig` (and, optionally, its preprocessor_config.json)."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    pre = dict(preprocessor or {})
    vision = VisionConfig(
        image_size=vc.image_size,
        patch_size=vc.patch_size,
        width=vc.hidden_size,
        depth=vc.num_hidden_layers,
        num_heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size / vc.hidden_size,
        activation=_hf_activation(vc.hidden_act),
        norm_eps=vc.layer_norm_eps,
        image_mean=tuple(pre.get("image_mean") or OPENAI_MEAN),
        image_std=tuple(pre.get("image_std") or OPENAI_STD),
    )
    text = TextConfig(
        context_length=tc.max_position_embeddings,
        vocab_size=tc.vocab_size,
        width=tc.hidden_size,
        depth=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads,
        mlp_ratio=tc.intermediate_size / tc.hidden_size,
        activation=_hf_activation(tc.hidden_act),
        norm_eps=tc.layer_norm_eps,
    )
    return CLIPConfig(
        embed_dim=hf_config.projection_dim,
        vision=vision,
        text=text,
        init_logit_scale=float(hf_config.logit_scale_init_value),
    )


def _hf_activation(name: str) -> str:
    if name in ("gelu", "quick_gelu"):
        return name
    raise ValueError(f"unsupported transformers hidden_act {name!r}; vlm implements 'gelu' and 'quick_gelu'")


def from_hf(hf_model_or_dir: Any, *, local_files_only: bool | None = None) -> CLIP:
    """A vlm `CLIP` from a transformers `CLIPModel`, a directory saved by `save_pretrained`, or a
    Hugging Face repo id (downloaded by transformers when online, read from its cache offline)."""
    preprocessor = None
    if isinstance(hf_model_or_dir, (str, Path)):
        hf_model, preprocessor = _load_hf(hf_model_or_dir, local_files_only)
    else:
        hf_model = hf_model_or_dir
    if type(hf_model).__name__ != "CLIPModel":
        raise TypeError(
            f"from_hf takes a transformers CLIPModel (or its directory), got {type(hf_model).__name__}; "
            "SigLIP and other architectures are not CLIP ViTs"
        )
    config = config_from_hf(hf_model.config, preprocessor)
    converted = hf_state_dict_to_vlm(hf_model.state_dict(), config)
    model = CLIP(config, device="meta").to_empty(device=converted["logit_scale"].device)
    return _load_into(_as_dtype(model, converted), converted)


def _load_hf(name: str | Path, local_files_only: bool | None) -> tuple[Any, dict[str, Any] | None]:
    import json

    from transformers import CLIPModel

    path = Path(name)
    local = path.is_dir()
    if local_files_only is None:
        local_files_only = local
    if not local and path.exists():
        raise ValueError(f"{path} is a file; from_hf takes a directory holding config.json and the weights")
    try:
        hf_model = CLIPModel.from_pretrained(str(name), local_files_only=local_files_only)
    except OSError as err:
        raise ValueError(
            f"could not load a transformers CLIPModel from {str(name)!r} ({err}); give a directory written by "
            "CLIPModel.save_pretrained, or a Hugging Face repo id while online"
        ) from err
    preprocessor = None
    if local and (path / "preprocessor_config.json").is_file():
        preprocessor = json.loads((path / "preprocessor_config.json").read_text())
    return hf_model, preprocessor


def hf_config_from_vlm(config: CLIPConfig) -> Any:
    """A transformers `CLIPConfig` of the same architecture, for `CLIPModel(...)` to load
    `vlm_state_dict_to_hf` weights into. Imports transformers when called."""
    from transformers import CLIPConfig as HFCLIPConfig

    v, t = config.vision, config.text
    return HFCLIPConfig(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.mlp_width,
            num_hidden_layers=t.depth,
            num_attention_heads=t.num_heads,
            max_position_embeddings=t.context_length,
            hidden_act=t.activation,
            layer_norm_eps=t.norm_eps,
            projection_dim=config.embed_dim,
            # Pooling at the first end-of-text token (49407) is where vlm pools (the highest id).
            bos_token_id=t.vocab_size - 2,
            eos_token_id=t.vocab_size - 1,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=v.mlp_width,
            num_hidden_layers=v.depth,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.activation,
            layer_norm_eps=v.norm_eps,
            projection_dim=config.embed_dim,
        ),
        projection_dim=config.embed_dim,
        logit_scale_init_value=config.init_logit_scale,
    )


def to_hf(model: CLIP) -> nn.Module:
    """A transformers `CLIPModel` with this model's weights."""
    from transformers import CLIPModel

    config = model.config
    if config.init_logit_bias is not None or model.logit_bias is not None:
        raise ValueError("transformers' CLIPModel has no logit_bias; a sigmoid-loss model cannot be exported to it")
    hf = CLIPModel(hf_config_from_vlm(config)).to(device=model.logit_scale.device, dtype=model.logit_scale.dtype)
    state = vlm_state_dict_to_hf(model.state_dict(), config)
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"internal: HF key table out of date: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return hf.eval() if not model.training else hf
