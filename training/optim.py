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


def param_groups(model: CLIP, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for trainable weights with ndim >= 2 outside `no_weight_decay()`
    (so not embeddings, norms, biases or `logit_scale`), none for the rest."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and name not in skip else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: CLIP, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, config.weight_decay)`; ValueError when no parameter is trainable."""
    groups = param_groups(model, config.weight_decay)
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


def lock_image_tower(model: CLIP, unlocked_blocks: int = 0) -> None:
    """LiT: freeze the image tower, except its last `unlocked_blocks` blocks and, when any block is
    unlocked, the modules that read their output (final norm, attention pooling, projection)."""
    visual = model.visual
    blocks = visual.transformer.blocks
    if unlocked_blocks > len(blocks):
        raise ValueError(
            f"model.unlocked_blocks={unlocked_blocks} but the image tower has {len(blocks)} blocks; "
            f"use at most {len(blocks)}"
        )
    if model.config.share_transformer:
        raise ValueError(
            "model.lock_image cannot lock a tower whose Transformer is shared with the text tower "
            "(share_transformer=True); train both or use a model without sharing"
        )
    visual.requires_grad_(False)
    trainable: list[nn.Module] = list(blocks[len(blocks) - unlocked_blocks :]) if unlocked_blocks else []
    if unlocked_blocks:
        trainable += visual.head_modules()
    for module in trainable:
        module.requires_grad_(True)
    frozen = sum(p.numel() for p in visual.parameters() if not p.requires_grad)
    logger.info("image tower locked: %s parameters frozen, %d block(s) trainable", f"{frozen:,}", unlocked_blocks)


@torch.no_grad()
def clamp_logit_scale(model: CLIP, max_scale: float = 100.0) -> None:
    """Keeps exp(logit_scale) in [1, max_scale] (CLIP clamps at 100 to keep the softmax trainable)."""
    model.logit_scale.clamp_(0, math.log(max_scale))
