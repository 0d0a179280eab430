"""Evaluation metrics shared by zero-shot classification, retrieval and training: the one place they live.

The tie rule, for every recall and top-k accuracy here: ties count against the query. A query's rank is
the number of wrong candidates that score at least as high as its best correct one (rank 0 is a hit at
k=1), so a model that scores everything alike gets chance-level numbers, never perfect ones, and the
order in which a search engine happens to return equal scores changes nothing.

Recall@k comes in two forms that apply that rule: `recall_at_k_from_scores` for a full score matrix
(training, zero-shot), `recall_at_k_from_ids` for ranked search results (FAISS's ``D, I``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "topk_accuracy",
    "recall_at_k_from_scores",
    "recall_at_k_from_ids",
    "RetrievalRecall",
    "retrieval_recall",
    "positives_from_ids",
    "confusion_matrix",
    "per_class_recall",
]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers such as (1, 5), got {ks!r}")
    return ks


def _ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """Per query row: the number of negatives scoring >= the best positive (0 = a hit at k=1; every
    negative when the row has no positive)."""
    scores = scores.float()
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((scores >= best) & ~positives).sum(dim=1)


def _recall(ranks: Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    # float64: a fraction of queries should not pick up float32 rounding (1/3 -> 0.33333334).
    return {k: (ranks < k).double().mean().item() for k in ks}


def recall_at_k_from_scores(scores: Tensor, positives: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """The fraction of queries (rows of `scores`, (Q, D)) with a positive among their top k candidates,
    ties counting against the query (see the module docstring).

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
        raise ValueError("recall_at_k_from_scores needs at least one query; scores has no rows")
    missing = (~positives.any(dim=1)).nonzero().flatten()
    if len(missing):
        raise ValueError(f"queries {missing[:5].tolist()} have no positive candidate; every query needs one")
    return _recall(_ranks(scores, positives), ks)


def recall_at_k_from_ids(
    I: np.ndarray,
    positives: Sequence[Iterable[int]],
    ks: Sequence[int] = (1, 5, 10),
    D: np.ndarray | None = None,
) -> dict[int, float]:
    """The fraction of queries with a true id among their first k results, for ranked result ids `I`
    (nq, >= max(ks), best first, -1 for padding) and the true ids of each query (a query whose true ids
    were not returned is a miss).

    With the results' scores `D` (nq, same width), ties count against the query as in
    `recall_at_k_from_scores`: a result scoring the same as the first true one counts ahead of it.
    Without `D`, the order of `I` is the ranking. A true result tied with the last one returned may tie
    with results not returned: to be exact, ask for max(ks) plus the query's number of true ids.
    """
    ks = _check_ks(ks)
    I = np.asarray(I)
    if I.ndim != 2 or len(I) != len(positives):
        raise ValueError(f"I must be (nq, k) with one set of positives per query, got {I.shape} and {len(positives)}")
    if max(ks) > I.shape[1]:
        raise ValueError(f"recall@{max(ks)} needs at least {max(ks)} results per query, got {I.shape[1]}")
    if D is not None and np.shape(D) != I.shape:
        raise ValueError(f"D must have the shape of I {I.shape} (one score per result), got {np.shape(D)}")
    if not len(I):
        return {k: 0.0 for k in ks}
    hits = np.stack([np.isin(row, np.fromiter(true, dtype=np.int64)) for row, true in zip(I, positives)])
    # Without scores, strictly decreasing ones: the position in I is the rank.
    scores = -np.broadcast_to(np.arange(I.shape[1], dtype=np.float32), I.shape) if D is None else np.asarray(D)
    return _recall(_ranks(torch.from_numpy(np.ascontiguousarray(scores)), torch.from_numpy(hits)), ks)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """The fraction of rows of `scores` (N, C) whose true class `labels[i]` is among the top k."""
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    labels = labels.to(scores.device).long()
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must be class indices in [0, {scores.shape[1]}), got {labels.min()}..{labels.max()}")
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(labels), device=scores.device), labels] = True
    return recall_at_k_from_scores(scores, positives, ks)


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
        image_to_text=recall_at_k_from_scores(scores, positives, ks),
        text_to_image=recall_at_k_from_scores(scores.T, positives.T, ks),
    )


def confusion_matrix(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_recall(confusion: Tensor) -> Tensor:
    """(C,) fraction of each class's images predicted as that class; NaN for classes with no images."""
    totals = confusion.sum(dim=1).double()
    return torch.where(totals > 0, confusion.diagonal().double() / totals.clamp(min=1), math.nan)
