"""Patch dropout in a training run (FLIP, https://arxiv.org/abs/2212.00794): `model.patch_dropout` sets the
image tower's rate, and `model.patch_dropout_unmasked_steps` ends the run with FLIP's unmasked tuning, the
last steps on every patch, so that the model finishes on the token count it is evaluated with.

Before each step `patch_dropout_step` applies the switch and seeds the tower's mask generator from the
run's seed, the step and the process: both are functions of the step alone, so a run resumed on either
side of the switch draws the masks the uninterrupted run drew (the global generator would not do: the
data loader draws from it when it starts again).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from vlm.model import CLIP

    from .config import ModelConfig, ScheduleConfig, TrainConfig

__all__ = ["apply_patch_dropout", "check_unmasked_steps", "patch_dropout_step", "set_patch_dropout", "unmasked_from"]

# A last entropy word of its own keeps the masks' seeds apart from the data's (training.data.sample_seed).
_STREAM = 0x5D

logger = logging.getLogger(__name__)


def set_patch_dropout(model: "CLIP", prob: float) -> None:
    """The image tower's patch dropout, recorded in the model's config (saved with it, as open_clip's
    vision_cfg records it)."""
    model.config = model.config.replace(vision={"patch_dropout": prob})
    model.visual.config = model.config.vision


def check_unmasked_steps(model: "ModelConfig", schedule: "ScheduleConfig") -> None:
    """Unmasked tuning must leave some steps with dropout: otherwise dropout would never apply."""
    n = model.patch_dropout_unmasked_steps
    if n and n >= schedule.steps:
        raise ValueError(
            f"model.patch_dropout_unmasked_steps ({n}) leaves no step of schedule.steps ({schedule.steps}) with "
            "patch dropout; use fewer unmasked steps (FLIP: about 5% of the run; on a tiny patch grid, more) "
            "or set model.patch_dropout=0"
        )


def apply_patch_dropout(model: "CLIP", config: "ModelConfig") -> None:
    """`model.patch_dropout` on the built model (0 keeps the model's own rate); unmasked steps need a rate."""
    if config.patch_dropout:
        set_patch_dropout(model, config.patch_dropout)
    if config.patch_dropout_unmasked_steps and not model.config.vision.patch_dropout:
        raise ValueError(
            f"model.patch_dropout_unmasked_steps={config.patch_dropout_unmasked_steps} turns patch dropout off "
            f"for the last steps, and {config.name!r} has no patch dropout; set model.patch_dropout (0.5 is "
            "usual) or drop model.patch_dropout_unmasked_steps"
        )


def unmasked_from(model: "ModelConfig", schedule: "ScheduleConfig") -> int | None:
    """The first step (0-based, as `TrainerState.step` before it) trained on every patch; None: no switch."""
    n = model.patch_dropout_unmasked_steps
    return schedule.steps - n if n else None


def patch_dropout_step(model: "CLIP", config: "TrainConfig", step: int, rank: int, device: torch.device) -> None:
    """Before the step that starts at `step` on process `rank`: patch dropout off once the unmasked steps
    are due, else the tower's mask generator seeded for this step."""
    visual, start = model.visual, unmasked_from(config.model, config.schedule)
    if start is not None and step >= start and visual.config.patch_dropout:
        logger.info(
            "step %d: patch dropout %g off for the last %d steps (unmasked tuning)",
            step, visual.config.patch_dropout, config.schedule.steps - step,
        )
        set_patch_dropout(model, 0.0)
    if not visual.config.patch_dropout:
        return
    if visual.patch_dropout_generator is None:
        visual.patch_dropout_generator = torch.Generator(device=device)
    entropy = [config.seed, step, rank, _STREAM]
    visual.patch_dropout_generator.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
