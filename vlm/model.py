"""CLIP: an image tower and a text tower projected into one embedding space."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CLIPConfig
from .presets import get_preset
from .text import TextTower
from .vision import VisionTower

__all__ = ["CLIP", "CLIPOutput", "create_model"]


@dataclass
class CLIPOutput:
    """L2-normalised embeddings of both towers and the model's score parameters."""

    image_embeds: Tensor  # (B, E)
    text_embeds: Tensor  # (T, E)
    logit_scale: Tensor  # scalar, already exponentiated
    logit_bias: Tensor | None  # scalar for sigmoid-loss models, else None

    @property
    def logits_per_image(self) -> Tensor:
        """(B, T) scaled cosine similarities (plus the bias for sigmoid-loss models)."""
        logits = self.logit_scale * self.image_embeds @ self.text_embeds.T
        return logits if self.logit_bias is None else logits + self.logit_bias

    @property
    def logits_per_text(self) -> Tensor:
        """(T, B): `logits_per_image` transposed, one row per text."""
        return self.logits_per_image.T


class CLIP(nn.Module):
    """The model. `encode_image` and `encode_text` give embeddings, `forward` both plus the scale.

    State-dict keys (``visual.*``, ``text.*``, ``logit_scale``, ``logit_bias``) are public API: the
    converters in `vlm.convert` translate open_clip and transformers checkpoints to and from them.
    """

    def __init__(
        self, config: CLIPConfig, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.config = config
        self.visual = VisionTower(config.vision, config.embed_dim, **dd)
        shared = self.visual.transformer if config.share_transformer else None
        self.text = TextTower(config.text, config.embed_dim, transformer=shared, **dd)
        self.logit_scale = nn.Parameter(torch.full((), config.init_logit_scale, **dd))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.full((), config.init_logit_bias, **dd))
        else:
            self.logit_bias = None
        # Where the tokenizer files were found when the model was loaded (a directory), for
        # `vlm.get_tokenizer(model)`; None: `config.text.tokenizer` names them. Kept out of the config, so that
        # the same weights loaded from two places have one fingerprint.
        self.tokenizer_path: Path | None = None
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    # ---- encoders ------------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Images (B, 3, H, W), normalised as `vlm.image_transform(model)` does -> (B, embed_dim)."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Token ids (B, L) from `vlm.get_tokenizer(model)` -> (B, embed_dim)."""
        x = self.text(text)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: Tensor, text: Tensor) -> CLIPOutput:
        """Images (B, 3, H, W) and token ids (T, L) -> both L2-normalised embeddings (B, E), (T, E) and
        the exponentiated logit scale (and bias); `.logits_per_image` scores every pair."""
        return CLIPOutput(
            image_embeds=self.encode_image(images, normalize=True),
            text_embeds=self.encode_text(text, normalize=True),
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
        )

    # ---- switches ------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (both towers):
        less memory for one extra forward pass per step; outputs and gradients are unchanged."""
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        """False switches every attention to the reference (explicit softmax) path."""
        self.visual.transformer.set_fused_attention(enable)
        self.text.transformer.set_fused_attention(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay beyond the ndim < 2 rule."""
        return {f"visual.{n}" for n in self.visual.no_weight_decay()} | {
            f"text.{n}" for n in self.text.no_weight_decay()
        }

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """open_clip's initialisation: scaled normal projections, small position embeddings."""
        v, t = self.visual, self.text
        scale = v.config.width**-0.5
        if v.class_token is not None:
            nn.init.normal_(v.class_token, std=scale)
        nn.init.normal_(v.pos_embed, std=scale)
        _init_projection(v.proj, v.config.width)
        nn.init.normal_(t.token_embed.weight, std=0.02)
        nn.init.normal_(t.pos_embed, std=0.01)
        _init_projection(t.proj, t.config.width)
        if v.attn_pool is not None:
            _init_attn_pool(v.attn_pool, scale)
        _init_transformer(v.transformer)
        if t.transformer is not v.transformer:
            _init_transformer(t.transformer)

    # ---- identity and persistence --------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the config and the weights: artifacts built with this model record it."""
        h = hashlib.sha256(json.dumps(self.config.identity_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes `config.json` and `model.safetensors` into `directory`; `vlm.load(directory)` reads them."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "CLIP":
        """A model saved with `save_pretrained`, bit-exactly; `kwargs` (`device`, `dtype`) go to
        `vlm.checkpoint.load_pretrained`."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, **kwargs)


def _init_transformer(transformer: nn.Module) -> None:
    width = transformer.width
    depth = len(transformer.blocks)
    attn_std = width**-0.5
    proj_std = attn_std * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.blocks:
        attn = block.attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            nn.init.normal_(proj.weight, std=attn_std)
            nn.init.zeros_(proj.bias)
        nn.init.normal_(attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(attn.out_proj.bias)
        nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        nn.init.normal_(block.mlp.fc2.weight, std=proj_std)


def _init_projection(proj: nn.Module, width: int) -> None:
    if isinstance(proj, nn.Linear):
        nn.init.normal_(proj.weight, std=width**-0.5)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


def _init_attn_pool(pool: nn.Module, scale: float) -> None:
    # timm's AttentionPoolLatent: a probe of std width**-0.5; the projections as in the blocks.
    nn.init.normal_(pool.probe, std=scale)
    attn = pool.attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
        nn.init.normal_(proj.weight, std=scale)
        nn.init.zeros_(proj.bias)
    nn.init.normal_(pool.mlp.fc1.weight, std=(2 * scale**-2) ** -0.5)
    nn.init.normal_(pool.mlp.fc2.weight, std=scale)


def create_model(
    preset_or_config: str | CLIPConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> CLIP:
    """A randomly initialised model from a preset name (see `vlm.list_presets()`) or a `CLIPConfig`.

    `overrides` replace config fields, e.g. ``create_model("tiny", embed_dim=32, vision={"depth": 1})``.
    """
    if isinstance(preset_or_config, str):
        config = get_preset(preset_or_config)
    elif isinstance(preset_or_config, CLIPConfig):
        config = preset_or_config
    else:
        raise TypeError(
            f"create_model takes a preset name or a CLIPConfig, got {type(preset_or_config).__name__}"
        )
    if overrides:
        config = config.replace(**overrides)
    return CLIP(config, device=device, dtype=dtype)
