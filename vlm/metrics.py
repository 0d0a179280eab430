"""Evaluation metrics shared by zero-shot classification, retrieval and training.

Ties count against the query: an item is ranked by how many wrong candidates score at least as high
as its best correct one, so a model that scores everything alike gets chance-level numbers, never
perfect ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["topk_accuracy", "recall_at_k", "RetrievalRecall", "retrieval_recall", "positives_from_ids"]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers such as (1, 5), got {ks!r}")
    return ks


def _ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """Per query row: the number of negatives scoring >= the best positive (0 = a hit at k=1)."""
    scores = scores.float()
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((scores >= best) & ~positives).sum(dim=1)


def recall_at_k(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """The fraction of queries (rows of `scores`, (Q, D)) with a positive among their top k candidates.

    `positives` is a boolean (Q, D) mask of the correct candidates of each query; every query needs
    at least one. This is the CLIP paper's recall for paired collections: an image query succeeds if
    any of its captions is in the top k, a caption query if its image is.
    """
    ks = _check_ks(ks)
    if scores.ndim != 2 or positives.shape != scores.shape:
        raise ValueError(
            f"scores (Q, D) and positives must have the same 2-D shape, got {tuple(scores.shape)} and "
            f"{tuple(positives.shape)}"
        )
    positives = positives.to(device=scores.device, dtype=torch.bool)
    if len(scores) == 0:
        raise ValueError("recall_at_k needs at least one query; scores has no rows")
    missing = (~positives.any(dim=1)).nonzero().flatten()
    if len(missing):
        raise ValueError(f"queries {missing[:5].tolist()} have no positive candidate; every query needs one")
    ranks = _ranks(scores, positives)
    return {k: (ranks < k).float().mean().item() for k in ks}


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """The fraction of rows of `scores` (N, C) whose true class `labels[i]` is among the top k."""
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    labels = labels.to(scores.device).long()
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {scores.shape[1]}), got {labels.min()}..{labels.max()}")
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(labels), device=scores.device), labels] = True
    return recall_at_k(scores, positives, ks)


def positives_from_ids(image_ids: Sequence[int] | Tensor, text_ids: Sequence[int] | Tensor) -> Tensor:
    """A (n_images, n_texts) mask, True where image i and text j belong to the same pair or group.

    Pass the same ids for images and texts that describe each other, e.g. the image index of each
    caption when an image has several captions.
    """
    image_ids = torch.as_tensor(image_ids)
    text_ids = torch.as_tensor(text_ids)
    return image_ids[:, None] == text_ids[None, :]


@dataclass(frozen=True)
class RetrievalRecall:
    """Recall@k in both directions, as fractions in [0, 1]."""

    image_to_text: dict[int, float]
    text_to_image: dict[int, float]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat names such as ``image_to_text_R@1``."""
        out = {f"{prefix}image_to_text_R@{k}": v for k, v in self.image_to_text.items()}
        out.update({f"{prefix}text_to_image_R@{k}": v for k, v in self.text_to_image.items()})
        return out


def retrieval_recall(
    image_embeds: Tensor,
    text_embeds: Tensor,
    positives: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> RetrievalRecall:
    """Image-to-text and text-to-image recall@k of normalised embeddings (N_img, E) and (N_txt, E).

    `positives` (N_img, N_txt) marks matching pairs; None means one caption per image, in order.
    """
    if positives is None:
        if len(image_embeds) != len(text_embeds):
            raise ValueError(
                f"{len(image_embeds)} images and {len(text_embeds)} texts: without `positives`, image i must "
                "pair with text i; pass positives=positives_from_ids(...) for other layouts"
            )
        positives = torch.eye(len(image_embeds), dtype=torch.bool)
    scores = image_embeds.float() @ text_embeds.float().T  # (N_img, N_txt)
    positives = positives.to(scores.device)
    return RetrievalRecall(
        image_to_text=recall_at_k(scores, positives, ks),
        text_to_image=recall_at_k(scores.T, positives.T, ks),
    )
