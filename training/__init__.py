"""Contrastive training of vlm models: `vlm train`, or `train(load_config(...))` from Python.

accelerate, datasets and matplotlib are imported only by the functions that need them.
"""

from .config import TrainConfig, load_config
from .loop import NonFiniteLossError, TrainResult, train
from .losses import clip_loss, contrastive_loss, sigmoid_loss

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "clip_loss",
    "contrastive_loss",
    "load_config",
    "sigmoid_loss",
    "train",
]
