"""Optimiser, learning-rate schedule, tower locking and the temperature clamp."""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from torch import nn

from vlm.model import CLIP

from .config import OptimConfig, ScheduleConfig

__all__ = [
    "param_groups",
    "build_optimizer",
    "build_scheduler",
    "lr_at",
    "lock_tower",
    "lock_image_tower",
    "TOWER_EMBEDDINGS",
    "clamp_logit_scale",
]

logger = logging.getLogger(__name__)


# What each tower reads before its first block, by attribute: always frozen in a locked tower
# (`lock_tower`), and the layer below block 0 in layer-wise lr decay (`param_groups`).
TOWER_EMBEDDINGS = {
    "image": ("patch_embed", "class_token", "pos_embed", "norm_pre"),
    "text": ("token_embed", "pos_embed"),
}
_TOWER_ATTRS = {"image": "visual", "text": "text"}
# The config key that sets each tower's unlocked blocks, named in errors.
_UNLOCKED_KEYS = {"image": "model.unlocked_blocks", "text": "model.lock_text_unlocked_blocks"}


def _image_layer(name: str, depth: int) -> int:
    """0 for the image tower's embedding (patches, class token, positions, pre-norm), i + 1 for its
    block i, depth + 1 for everything above (final norm, pooling, projection, a head, the text tower)."""
    if name.startswith("visual.transformer.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith("visual.") and name.split(".")[1] in TOWER_EMBEDDINGS["image"]:
        return 0
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of the trainable parameters of a CLIP or an image classifier (anything with an image
    tower `visual` and `no_weight_decay()`).

    Weight decay goes on weights with ndim >= 2 outside `no_weight_decay()` (so not embeddings, norms,
    biases or `logit_scale`), none on the rest. Layer-wise lr decay (`layer_decay` < 1, which needs
    `lr`): block i of the image tower's D trains at lr * layer_decay ** (D - i), its embeddings at
    lr * layer_decay ** (D + 1), everything above at lr. With layer_decay 1: two groups, decay first."""
    if layer_decay != 1 and lr is None:
        raise ValueError("param_groups: layer_decay needs the base lr to scale; pass lr=")
    skip = model.no_weight_decay()
    depth = len(model.visual.transformer.blocks)
    top = depth + 1
    groups: dict[tuple[int, bool], dict] = {(top, True): {"params": []}, (top, False): {"params": []}}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = param.ndim >= 2 and name not in skip
            layer = _image_layer(name, depth) if layer_decay != 1 else top
            groups.setdefault((layer, decay), {"params": []})["params"].append(param)
    for (layer, decay), group in groups.items():
        group["weight_decay"] = weight_decay if decay else 0.0
        if lr is not None:
            group["lr"] = lr * layer_decay ** (top - layer)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups` (with `config.layer_decay`); ValueError when no parameter is trainable."""
    groups = param_groups(model, config.weight_decay, lr=config.lr, layer_decay=config.layer_decay)
    if not any(g["params"] for g in groups):
        raise ValueError(
            "the model has no trainable parameters; unlock a tower (model.lock_image=false, model.lock_text=false)"
        )
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def lr_at(step: int, config: ScheduleConfig) -> float:
    """The learning-rate factor at `step`: linear warmup from 1/warmup, then a cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that multiplies the base learning rate by `lr_at(step)`; step it once per optimiser step."""
    # A partial, not a callable object: LambdaLR would store an object's attributes (the config) in
    # its state dict, which checkpoints load with torch.load(weights_only=True).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_at, config=config))


def lock_tower(model: nn.Module, tower: str, unlocked_blocks: int = 0, *, freeze_norms: bool = True) -> None:
    """LiT / SigLiT, and fine-tuning's last-N-blocks: freeze the `tower` ("image" or "text") of `model` (a
    CLIP, or an image classifier for "image").

    One rule for both towers: the embeddings (`TOWER_EMBEDDINGS`) are always frozen; the last
    `unlocked_blocks` blocks stay trainable, and, when any block does, so does everything that reads their
    output (final norm, attention pooling, projection). open_clip's `lock_text` counts its projection as a
    group of its own; here the count is of blocks, as for the image tower. With `freeze_norms=False` every
    LayerNorm of the tower trains too (open_clip's freeze_layer_norm=False for HF text towers): 2 x width
    parameters per norm (25,600 in ViT-B-32's text tower) that let a frozen tower adapt to new data.

    Frozen parameters get requires_grad=False, so `build_optimizer` keeps no state for them (8 bytes per
    parameter under AdamW in fp32) and backward computes no gradient for them."""
    module, key = _tower(model, tower), _UNLOCKED_KEYS[tower]
    depth = len(module.transformer.blocks)
    if not 0 <= unlocked_blocks <= depth:
        raise ValueError(f"{key}={unlocked_blocks} but the {tower} tower has {depth} blocks; use 0 to {depth}")
    if _shares_transformer(model, _TOWER_ATTRS[tower]):
        raise ValueError(
            f"cannot lock a {tower} tower whose Transformer is shared with the other tower "
            f"(share_transformer=True): locking one would lock both; train both towers (no model.lock_{tower} "
            f"or {key}) or use a model without sharing"
        )
    for name, param in module.named_parameters():
        param.requires_grad_(_unlocked(name, tower, depth, unlocked_blocks))
    if not freeze_norms:
        for norm in module.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.requires_grad_(True)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    logger.info(
        "%s tower locked: %s parameters frozen, %d block(s) trainable, norms %s",
        tower, f"{frozen:,}", unlocked_blocks, "frozen" if freeze_norms else "trainable",
    )


def lock_image_tower(model: nn.Module, unlocked_blocks: int = 0, *, freeze_norms: bool = True) -> None:
    """`lock_tower(model, "image", ...)`: the image tower of a CLIP or of an image classifier."""
    lock_tower(model, "image", unlocked_blocks, freeze_norms=freeze_norms)


def _tower(model: nn.Module, tower: str) -> nn.Module:
    if tower not in _TOWER_ATTRS:
        raise ValueError(f"tower must be one of {', '.join(map(repr, _TOWER_ATTRS))}, got {tower!r}")
    attr = _TOWER_ATTRS[tower]
    if not hasattr(model, attr):
        raise ValueError(f"{type(model).__name__} has no {tower} tower (no .{attr}); lock the image tower only")
    return getattr(model, attr)


def _unlocked(name: str, tower: str, depth: int, unlocked_blocks: int) -> bool:
    """Whether parameter `name` (relative to the tower) trains under the locking rule of `lock_tower`."""
    top = name.split(".")[0]
    if top == "transformer":
        return int(name.split(".")[2]) >= depth - unlocked_blocks
    return unlocked_blocks > 0 and top not in TOWER_EMBEDDINGS[tower]


def _shares_transformer(model: nn.Module, attr: str) -> bool:
    """True when a module outside tower `attr` runs that tower's Transformer (share_transformer)."""
    stack = getattr(model, attr).transformer
    return any(
        m is stack for name, m in model.named_modules(remove_duplicate=False) if not name.startswith(attr + ".")
    )


@torch.no_grad()
def clamp_logit_scale(model: CLIP, max_scale: float = 100.0) -> None:
    """Keeps exp(logit_scale) in [1, max_scale] (CLIP clamps at 100 to keep the softmax trainable)."""
    model.logit_scale.clamp_(0, math.log(max_scale))
