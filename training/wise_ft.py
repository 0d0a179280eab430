"""WiSE-FT (Wortsman et al. 2022): interpolating the zero-shot and fine-tuned weights, and the sweep of
accuracy and robustness over the mixing coefficient."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .classifier import ImageClassifier, LoadedImages, evaluate_classifier

__all__ = ["wise_ft", "WiseFTPoint", "wise_ft_sweep", "sweep_to_json"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def wise_ft(zeroshot: ImageClassifier, finetuned: ImageClassifier, alpha: float) -> ImageClassifier:
    """A new classifier with weights (1 - alpha) * zeroshot + alpha * finetuned.

    `torch.lerp` computes each end from its own side, so alpha=0 and alpha=1 give the endpoints bit for bit.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"the WiSE-FT coefficient must be in [0, 1] (0 = zero-shot, 1 = fine-tuned), got {alpha!r}")
    if zeroshot.class_names != finetuned.class_names:
        raise ValueError("WiSE-FT needs two classifiers over the same classes; these differ")
    a, b = zeroshot.state_dict(), finetuned.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("WiSE-FT needs two classifiers of the same architecture; their weights differ in shape")
    mixed = ImageClassifier(finetuned.clip_config, finetuned.class_names, finetuned.image_size)
    mixed.load_state_dict({k: torch.lerp(a[k].float(), b[k].float(), alpha).to(b[k].dtype) for k in a})
    return mixed.eval()


@dataclass(frozen=True)
class WiseFTPoint:
    """One coefficient of a WiSE-FT sweep and the top-1 accuracies (fractions) it gives."""
    alpha: float
    accuracy: float  # top-1 on the held-out split
    robustness: float  # top-1 on its shifted copy


def wise_ft_sweep(
    zeroshot: ImageClassifier, finetuned: ImageClassifier, test: LoadedImages, shifted: LoadedImages, alphas: Sequence[float]
) -> list[WiseFTPoint]:
    """Accuracy and robustness of the interpolated classifier at each coefficient."""
    points = []
    for alpha in alphas:
        mixed = wise_ft(zeroshot, finetuned, alpha)
        points.append(
            WiseFTPoint(alpha, evaluate_classifier(mixed, test).top1, evaluate_classifier(mixed, shifted).top1)
        )
        logger.info("WiSE-FT alpha=%.2f: top-1 %.4f, shifted %.4f", alpha, points[-1].accuracy, points[-1].robustness)
    return points



def sweep_to_json(points: Sequence[WiseFTPoint]) -> list[dict]:
    """The sweep as a list of {alpha, accuracy, robustness} dicts."""
    return [asdict(p) for p in points]
