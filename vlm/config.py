"""Model configuration: frozen dataclasses nested like the modules they build, and one preset table."""

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
    "PRESETS",
    "get_preset",
    "list_presets",
    "OPENAI_MEAN",
    "OPENAI_STD",
]

# The normalisation constants every OpenAI / open_clip CLIP checkpoint was trained with.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = ("gelu", "quick_gelu")
INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")


def _positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}")


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

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "depth", "num_heads"):
            _positive_int("VisionConfig", name, getattr(self, name))
        if self.patch_size > self.image_size:
            raise ValueError(
                f"VisionConfig.patch_size ({self.patch_size}) is larger than image_size ({self.image_size}); "
                "use a patch size that divides the image size"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        _check_heads("VisionConfig", self.width, self.num_heads)
        if not self.mlp_ratio > 0:
            raise ValueError(f"VisionConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        _choice("VisionConfig", "activation", self.activation, ACTIVATIONS)
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
    def mlp_width(self) -> int:
        """Hidden channels of each block's MLP: width * mlp_ratio."""
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class TextConfig:
    """The text tower: a causal Transformer over byte-pair tokens, pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-5

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
        if self.share_transformer:
            v, t = self.vision, self.text
            mismatched = [
                f"{name} (vision {getattr(v, name)} vs text {getattr(t, name)})"
                for name in ("width", "depth", "num_heads", "mlp_ratio", "activation", "norm_eps")
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


def _reject_unknown(cls: type, data: Mapping[str, Any], owner: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {owner}; known keys are {sorted(known)}")


def _clip(embed_dim: int, vision: dict[str, Any], text: dict[str, Any], **kw: Any) -> CLIPConfig:
    return CLIPConfig(embed_dim=embed_dim, vision=VisionConfig(**vision), text=TextConfig(**text), **kw)


_B_TEXT = dict(width=512, depth=12, num_heads=8)
_L_TEXT = dict(width=768, depth=12, num_heads=12)
_QG = dict(activation="quick_gelu")

# One table: open_clip's names and shapes (vision heads = width // 64 as in open_clip), plus small
# presets for tests and demos. `-quickgelu` variants match OpenAI's original weights and HF's CLIPModel.
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B-32": _clip(512, dict(patch_size=32, width=768, depth=12, num_heads=12), _B_TEXT),
    "ViT-B-16": _clip(512, dict(patch_size=16, width=768, depth=12, num_heads=12), _B_TEXT),
    "ViT-L-14": _clip(768, dict(patch_size=14, width=1024, depth=24, num_heads=16), _L_TEXT),
    "ViT-B-32-quickgelu": _clip(512, dict(patch_size=32, width=768, depth=12, num_heads=12, **_QG), dict(_B_TEXT, **_QG)),
    "ViT-B-16-quickgelu": _clip(512, dict(patch_size=16, width=768, depth=12, num_heads=12, **_QG), dict(_B_TEXT, **_QG)),
    "ViT-L-14-quickgelu": _clip(768, dict(patch_size=14, width=1024, depth=24, num_heads=16, **_QG), dict(_L_TEXT, **_QG)),
    # Small presets: a forward and backward in well under a second on a 2-core CPU.
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
    "tiny-siglip": _clip(
        64,
        dict(image_size=32, patch_size=8, width=64, depth=2, num_heads=4),
        dict(context_length=32, width=64, depth=2, num_heads=4),
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10.0,
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
