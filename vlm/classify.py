"""Zero-shot classification of image collections (opened by `vlm.data.open_images`): top-k predictions
and their formatting.

Images are decoded in DataLoader workers and embedded in batches (`vlm.embed.embed_images`); an
unreadable image is reported by name, counted and skipped, never the end of the run. Scoring against
the classifier is one small matrix product per image on top of the image tower.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .data import Failure, ImageCollection
# Re-exported for demo/run.py and training/finetune*.py until they import vlm.data (the lead removes it).
from .embed import embed_images
from .model import CLIP
from .zeroshot import ZeroShotClassifier

__all__ = ["OUTPUT_FORMATS", "Classification", "Prediction", "classify_images", "format_predictions"]

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("table", "jsonl", "csv")
# Rows scored at a time when turning embeddings into top-k labels: bounds the (rows, C) score matrix.
_SCORE_ROWS = 4096


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, best first, with their probabilities."""

    source: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]


@dataclass
class Classification:
    """Embeddings of the readable images and the failures; `embeddings[j]` is `names[indices[j]]`."""

    classifier: ZeroShotClassifier
    names: Sequence[str]
    embeddings: Tensor  # (N_ok, E), L2-normalised
    indices: Tensor  # (N_ok,) positions in the collection
    failures: list[Failure]

    def probabilities(self) -> Tensor:
        """(N_ok, C) class probabilities (softmax, or per-class sigmoid for sigmoid-loss models)."""
        return torch.cat([self.classifier.probabilities(x) for x in self._chunks()])

    def top_k(self, k: int = 5) -> list[Prediction]:
        """Each readable image's `k` best classes (fewer if there are fewer classes)."""
        if k < 1:
            raise ValueError(f"top-k must be at least 1, got {k}")
        k = min(k, len(self.classifier.classes))
        labels = self.classifier.class_names
        sources = iter(self.indices.tolist())
        out = []
        for x in self._chunks():
            scores, classes = self.classifier.probabilities(x).topk(k, dim=-1)
            for s, c in zip(scores.tolist(), classes.tolist()):
                out.append(Prediction(self.names[next(sources)], tuple(labels[i] for i in c), tuple(s)))
        return out

    def _chunks(self) -> Iterator[Tensor]:
        # Never an empty iterator: no readable image gives one (0, E) chunk, and (0, C) scores.
        return iter(self.embeddings.split(_SCORE_ROWS))


def classify_images(
    model: CLIP,
    classifier: ZeroShotClassifier,
    images: ImageCollection | Sequence[Any],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    check_model: bool = True,
) -> Classification:
    """Embeds `images` (an `ImageCollection`, or a list of anything `vlm.load_image` reads) with the
    model's preprocessing and scores them against `classifier`; unreadable images are skipped and
    listed in `failures` by name.

    `check_model` refuses a classifier built with another model; it hashes every weight (about a
    second for ViT-B-32), which a caller that has just built or loaded the classifier with this
    model can skip.
    """
    if check_model:
        classifier.check_model(model)
    if not isinstance(images, ImageCollection):
        images = ImageCollection(images, [_describe(s, i) for i, s in enumerate(images)])
    embedded = embed_images(
        model, images.sources, batch_size=batch_size, num_workers=num_workers, normalize=True, progress=progress
    )
    failures = [Failure(f.index, images.names[f.index], f.reason) for f in embedded.failures]
    return Classification(classifier, images.names, embedded.embeddings, embedded.indices, failures)


def _describe(source: Any, index: int) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"[{index}]"


def format_predictions(predictions: Sequence[Prediction], fmt: str = "table") -> str:
    """Predictions as an aligned table, JSON lines or CSV (one row per image and rank)."""
    if fmt == "jsonl":
        return "\n".join(
            json.dumps({"image": p.source, "labels": list(p.labels), "scores": [round(s, 6) for s in p.scores]})
            for p in predictions
        )
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "score"])
        writer.writerows(
            (p.source, r, label, f"{s:.6f}")
            for p in predictions
            for r, (label, s) in enumerate(zip(p.labels, p.scores), 1)
        )
        return buffer.getvalue().rstrip("\n")
    if fmt == "table":
        return _table(predictions)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")


def _table(predictions: Sequence[Prediction]) -> str:
    if not predictions:
        return ""
    width = max(len("image"), *(len(p.source) for p in predictions))
    k = max(len(p.labels) for p in predictions)
    head = f"{'image':<{width}}  " + "  ".join(f"{f'top-{r}':<28}" for r in range(1, k + 1))
    rows = [
        f"{p.source:<{width}}  " + "  ".join(f"{f'{label[:20]} {s:.4f}':<28}" for label, s in zip(p.labels, p.scores))
        for p in predictions
    ]
    return "\n".join([head.rstrip(), *(r.rstrip() for r in rows)])
