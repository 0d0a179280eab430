"""Optimiser, learning-rate schedule, tower locking and the temperature clamp."""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
from torch import nn

from vlm.model import CLIP

from .config import OptimConfig, ScheduleConfig

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_at", "lock_image_tower", "clamp_logit_scale"]

logger = logging.getLogger(__name__)


def _image_layer(name: str, depth: int) -> int:
    """0 for the image tower's embedding (patches, class token, positions, pre-norm), i + 1 for its
    block i, depth + 1 for everything above (final norm, pooling, projection, a head, the text tower)."""
    if name.startswith("visual.transformer.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith(("visual.patch_embed", "visual.class_token", "visual.pos_embed", "visual.norm_pre")):
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
        raise ValueError("the model has no trainable parameters; unlock a tower (model.lock_image=false)")
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


def lock_image_tower(model: nn.Module, unlocked_blocks: int = 0) -> None:
    """LiT, and fine-tuning's last-N-blocks: freeze the image tower of `model` (a CLIP or an image
    classifier), except its last `unlocked_blocks` blocks and, when any block is unlocked, the modules
    that read their output (final norm, attention pooling, projection)."""
    visual = model.visual
    blocks = visual.transformer.blocks
    if unlocked_blocks > len(blocks):
        raise ValueError(
            f"model.unlocked_blocks={unlocked_blocks} but the image tower has {len(blocks)} blocks; "
            f"use at most {len(blocks)}"
        )
    if _shares_image_transformer(model):
        raise ValueError(
            "cannot lock an image tower whose Transformer is shared with the text tower "
            "(share_transformer=True); train both towers (no model.lock_image or model.unlocked_blocks) "
            "or use a model without sharing"
        )
    visual.requires_grad_(False)
    trainable: list[nn.Module] = list(blocks[len(blocks) - unlocked_blocks :]) if unlocked_blocks else []
    if unlocked_blocks:
        trainable += visual.head_modules()
    for module in trainable:
        module.requires_grad_(True)
    frozen = sum(p.numel() for p in visual.parameters() if not p.requires_grad)
    logger.info("image tower locked: %s parameters frozen, %d block(s) trainable", f"{frozen:,}", unlocked_blocks)


def _shares_image_transformer(model: nn.Module) -> bool:
    """True when a module outside the image tower runs the image tower's Transformer (share_transformer)."""
    tower = model.visual.transformer
    return any(
        m is tower for name, m in model.named_modules(remove_duplicate=False) if not name.startswith("visual.")
    )


@torch.no_grad()
def clamp_logit_scale(model: CLIP, max_scale: float = 100.0) -> None:
    """Keeps exp(logit_scale) in [1, max_scale] (CLIP clamps at 100 to keep the softmax trainable)."""
    model.logit_scale.clamp_(0, math.log(max_scale))
