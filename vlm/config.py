"""Model configuration: frozen dataclasses nested like the modules they build (named presets: `vlm.presets`)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "VisionConfig",
    "TextConfig",
    "CLIPConfig",
    "OPENAI_MEAN",
    "OPENAI_STD",
]

# The normalisation constants every OpenAI / open_clip CLIP checkpoint was trained with.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP and SigLIP 2 map pixels to [-1, 1]; CLIPA uses ImageNet's statistics.
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Exact GELU, GELU's tanh approximation (big_vision's default, SigLIP 2), QuickGELU (OpenAI's CLIP).
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")
# How the image tower reduces its tokens to one vector: the class token, the mean of the patch tokens,
# a learned probe attending over the patch tokens (SigLIP's MAP head), or no pooling (every token).
VISION_POOLS = ("token", "avg", "map", "none")
# Where the text tower reads its vector: at the end-of-text token, at the last position (SigLIP, CLIPA:
# the padding there sees the whole text through bidirectional attention) or at the first position.
TEXT_POOLS = ("eot", "last", "first")
# A tower's projection into the shared space: a matrix, a matrix with bias, or none (the pooled vector,
# the output of SigLIP's MAP head, is the embedding; then width must equal embed_dim).
PROJECTIONS = ("linear", "linear_bias", "none")
# Resampling of position embeddings to another patch grid: bicubic (open_clip, timm, transformers' CLIP and
# SigLIP) or bilinear with antialiasing (transformers' SigLIP 2 NaFlex).
POS_EMBED_RESAMPLES = ("bicubic", "bilinear_antialias")
# open_clip's text cleaning before tokenization (`open_clip.tokenizer.get_clean_fn`).
TEXT_CLEANS = ("lower", "canonicalize", "whitespace")
# The CLIP byte-pair vocabulary that ships with open_clip; any other `tokenizer` names Hugging Face tokenizer
# files (a repo id, or a directory holding them).
CLIP_TOKENIZER = "clip"


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}")


def _check_layer_scale(owner: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"{owner}.layer_scale must be None (no layer scale) or a positive initial value, got {value!r}")


def _check_heads(owner: str, width: int, num_heads: int) -> None:
    if width % num_heads:
        raise ValueError(
            f"{owner}.width ({width}) must be divisible by {owner}.num_heads ({num_heads}); "
            f"pick num_heads among {[h for h in range(1, width + 1) if width % h == 0 and h <= 64]}"
        )


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: a ViT over `patch_size` patches of an `image_size` square image."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # open_clip's ViT-B-32 uses exact GELU; OpenAI's original weights (and HF's default) use QuickGELU.
    activation: str = "gelu"
    norm_eps: float = 1e-5
    # Preprocessing travels with the model so a checkpoint always gets the transform it was trained with.
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    # The tower's shape around the Transformer. The defaults are OpenAI's CLIP ViT; SigLIP has no class token,
    # a bias in the patch embedding, no pre-LayerNorm, MAP pooling and no projection; CLIPA averages the patch
    # tokens and applies the final LayerNorm to the pooled vector.
    class_token: bool = True
    patch_bias: bool = False
    norm_pre: bool = True
    pool: str = "token"
    norm_after_pool: bool = False
    proj: str = "linear"
    # Per-channel scales on each residual branch (CaiT), initialised to this value; None: none.
    layer_scale: float | None = None
    pos_embed_resample: str = "bicubic"
    # Training only (FLIP, open_clip's vision_cfg.patch_dropout): the share of patch tokens each image drops
    # in training mode, the class token kept; 0.5 trains about twice as fast. Evaluation sees every patch.
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "num_heads"):
            _positive_int("VisionConfig", name, getattr(self, name))
        p = self.patch_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(
                f"VisionConfig.patch_dropout must be in [0, 1), got {self.patch_dropout!r}; "
                "use 0 for none, 0.5 to 0.75 to train faster (FLIP)"
            )
        if self.patch_size > self.image_size:
            raise ValueError(
                f"VisionConfig.patch_size ({self.patch_size}) is larger than image_size ({self.image_size}); "
                "use a patch size of at most the image size"
            )
        # image_size need not be a multiple of patch_size (SigLIP's So400m/14 at 384): the pixels beyond the
        # last whole patch are dropped, as timm and transformers do.
        _check_heads("VisionConfig", self.width, self.num_heads)
        if not self.mlp_ratio > 0:
            raise ValueError(f"VisionConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        _choice("VisionConfig", "activation", self.activation, ACTIVATIONS)
        for name in ("class_token", "patch_bias", "norm_pre", "norm_after_pool"):
            _check_bool("VisionConfig", name, getattr(self, name))
        _choice("VisionConfig", "pool", self.pool, VISION_POOLS)
        _choice("VisionConfig", "proj", self.proj, PROJECTIONS)
        _choice("VisionConfig", "pos_embed_resample", self.pos_embed_resample, POS_EMBED_RESAMPLES)
        _check_layer_scale("VisionConfig", self.layer_scale)
        if self.pool == "token" and not self.class_token:
            raise ValueError(
                "VisionConfig.pool='token' reads the class token, but class_token=False; "
                "use pool='avg' or pool='map', or set class_token=True"
            )
        _choice("VisionConfig", "interpolation", self.interpolation, INTERPOLATIONS)
        _choice("VisionConfig", "resize_mode", self.resize_mode, RESIZE_MODES)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"VisionConfig.{name} needs one value per RGB channel, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.image_std) <= 0:
            raise ValueError(f"VisionConfig.image_std must be positive, got {self.image_std!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side of an `image_size` image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (grid_size ** 2), not counting the class token."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: 1 with a class token, else 0."""
        return int(self.class_token)

    @property
    def mlp_width(self) -> int:
        """Hidden channels of each block's MLP: width * mlp_ratio."""
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class TextConfig:
    """The text tower: a Transformer over token ids, pooled at one position, and the tokenizer it was trained with.

    The defaults are CLIP's: causal attention over byte-pair tokens, pooled at the end-of-text token.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-5
    # False: every token attends to every other (SigLIP, CLIPA); then padding changes the result and the
    # tower runs the whole context.
    causal: bool = True
    pool: str = "eot"
    # The end-of-text id pool='eot' looks for (its first occurrence). None: the highest id of each row, where
    # CLIP's byte-pair tokenizer puts end-of-text (open_clip's 'argmax').
    eot_id: int | None = None
    pad_id: int = 0
    proj: str = "linear"
    layer_scale: float | None = None
    # The tokenizer: "clip" (CLIP's byte-pair vocabulary), or Hugging Face tokenizer files named by a repo id
    # or a directory (SigLIP's T5 vocabulary, SigLIP 2's Gemma vocabulary, XLM-V, BERT).
    tokenizer: str = CLIP_TOKENIZER
    # open_clip's cleaning: "lower" for CLIP's BPE, "canonicalize" (punctuation removed, lower case) for
    # SigLIP, "whitespace" (open_clip's default for Hugging Face tokenizers).
    tokenizer_clean: str = "lower"
    # CLIPA's BERT tokenizer: the [SEP] ids become 0, as in open_clip.
    strip_sep_token: bool = False

    def __post_init__(self) -> None:
        for name in ("context_length", "vocab_size", "width", "depth", "num_heads"):
            _positive_int("TextConfig", name, getattr(self, name))
        if self.context_length < 2:
            raise ValueError(
                f"TextConfig.context_length must hold at least the start and end tokens (2), got {self.context_length}"
            )
        _check_heads("TextConfig", self.width, self.num_heads)
        if not self.mlp_ratio > 0:
            raise ValueError(f"TextConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        _choice("TextConfig", "activation", self.activation, ACTIVATIONS)
        for name in ("causal", "strip_sep_token"):
            _check_bool("TextConfig", name, getattr(self, name))
        _choice("TextConfig", "pool", self.pool, TEXT_POOLS)
        _choice("TextConfig", "proj", self.proj, PROJECTIONS)
        _choice("TextConfig", "tokenizer_clean", self.tokenizer_clean, TEXT_CLEANS)
        _check_layer_scale("TextConfig", self.layer_scale)
        for name in ("eot_id", "pad_id"):
            value = getattr(self, name)
            if value is None and name == "eot_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"TextConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(
                f"TextConfig.tokenizer must be 'clip' or a Hugging Face tokenizer (repo id or directory), got {self.tokenizer!r}"
            )
        if self.tokenizer != CLIP_TOKENIZER and self.pool == "eot" and self.eot_id is None:
            raise ValueError(
                "TextConfig.pool='eot' with eot_id=None pools at each row's highest id, which is end-of-text only "
                f"for CLIP's tokenizer; with tokenizer={self.tokenizer!r}, set eot_id to its end-of-text id"
            )
        if self.tokenizer == CLIP_TOKENIZER and (self.tokenizer_clean != "lower" or self.strip_sep_token):
            raise ValueError(
                "CLIP's byte-pair tokenizer (tokenizer='clip') cleans with 'lower' and has no [SEP] token; "
                f"got tokenizer_clean={self.tokenizer_clean!r}, strip_sep_token={self.strip_sep_token}"
            )

    @property
    def mlp_width(self) -> int:
        """Hidden channels of each block's MLP: width * mlp_ratio."""
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class CLIPConfig:
    """Two towers projected into one `embed_dim` space."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # log(1/0.07): the temperature of the CLIP paper.
    init_logit_scale: float = math.log(1 / 0.07)
    # None: a contrastive (softmax) model. A number: a sigmoid-loss model with a learnable bias (SigLIP uses -10).
    init_logit_bias: float | None = None
    # One set of Transformer weights for both towers; needs equal widths, depths and head counts.
    share_transformer: bool = False

    def __post_init__(self) -> None:
        _positive_int("CLIPConfig", "embed_dim", self.embed_dim)
        if isinstance(self.vision, Mapping):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        if isinstance(self.text, Mapping):
            object.__setattr__(self, "text", TextConfig(**self.text))
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"CLIPConfig.vision must be a VisionConfig or a dict, got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise TypeError(f"CLIPConfig.text must be a TextConfig or a dict, got {type(self.text).__name__}")
        for tower in ("vision", "text"):
            sub = getattr(self, tower)
            if sub.proj == "none" and sub.width != self.embed_dim:
                raise ValueError(
                    f"CLIPConfig.{tower}.proj='none' makes the pooled vector the embedding, so {tower}.width "
                    f"({sub.width}) must equal embed_dim ({self.embed_dim}); use proj='linear' or change embed_dim"
                )
        if self.share_transformer:
            v, t = self.vision, self.text
            mismatched = [
                f"{name} (vision {getattr(v, name)} vs text {getattr(t, name)})"
                for name in ("width", "depth", "num_heads", "mlp_ratio", "activation", "norm_eps", "layer_scale")
                if getattr(v, name) != getattr(t, name)
            ]
            if mismatched:
                raise ValueError(
                    "CLIPConfig.share_transformer=True needs both towers to have the same Transformer shape; "
                    f"they differ in {', '.join(mismatched)}"
                )

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts of every field, as `from_dict` reads them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CLIPConfig":
        """The config `to_dict` wrote (a `format_version` key is ignored).

        Unknown keys at either level raise ValueError listing the known ones; bad values raise as the
        constructors do.
        """
        data = dict(data)
        data.pop("format_version", None)
        _reject_unknown(cls, data, "CLIPConfig")
        if isinstance(data.get("vision"), Mapping):
            _reject_unknown(VisionConfig, data["vision"], "CLIPConfig.vision")
        if isinstance(data.get("text"), Mapping):
            _reject_unknown(TextConfig, data["text"], "CLIPConfig.text")
        return cls(**data)

    def identity_dict(self) -> dict[str, Any]:
        """`to_dict` as a model's fingerprint hashes it: without `text.tokenizer` (where the vocabulary is
        found, not what it is: the tokenizer has its own fingerprint), and without the options added after
        vlm's first format while they hold their defaults, so that models saved before keep their
        fingerprints (and the classifiers built with them stay valid)."""
        data = self.to_dict()
        data["text"].pop("tokenizer")
        # Training only: the same weights compute the same embeddings whatever the dropout was.
        data["vision"].pop("patch_dropout")
        for tower, cls in (("vision", VisionConfig), ("text", TextConfig)):
            defaults = {f.name: f.default for f in fields(cls)}
            for name in _ADDED_FIELDS[tower]:
                if name in data[tower] and data[tower][name] == defaults[name]:
                    del data[tower][name]
        return data

    def to_json(self) -> str:
        """`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        """The config in a JSON file `to_json` wrote; ValueError if the file is not valid JSON."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); it should hold a CLIPConfig") from err
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "CLIPConfig":
        """A copy with `changes`; `vision=` and `text=` may be dicts of changes to the tower configs."""
        for tower in ("vision", "text"):
            if isinstance(changes.get(tower), Mapping):
                changes[tower] = dataclasses.replace(getattr(self, tower), **changes[tower])
        return dataclasses.replace(self, **changes)


# Config fields added after vlm's first model format (see `CLIPConfig.identity_dict`).
_ADDED_FIELDS = {
    "vision": (
        "class_token", "patch_bias", "norm_pre", "pool", "norm_after_pool", "proj", "layer_scale", "pos_embed_resample",
    ),
    "text": ("causal", "pool", "eot_id", "pad_id", "proj", "layer_scale", "tokenizer_clean", "strip_sep_token"),
}


def _reject_unknown(cls: type, data: Mapping[str, Any], owner: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {owner}; known keys are {sorted(known)}")

