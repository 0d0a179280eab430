"""Image-text retrieval recall@k of a paired collection (images with one or more captions each).

The CLIP paper's definition: a query counts as a hit at k if *any* of its true pairs is among its first
k results. Text-to-image: each caption has one true image. Image-to-text: each image has all its
captions as true pairs. Search is exact (FAISS flat inner product on L2-normalised embeddings).

`recall_at_k` is the metric alone, a pure function of ranked ids and true pairs; `vlm.metrics` (the
training side) may hold a twin for score matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from vlm.embed import embed_images, embed_texts
from vlm.model import CLIP

from .sources import open_source

__all__ = ["PairedRecall", "recall_at_k", "paired_recall", "evaluate_pairs"]

DEFAULT_KS = (1, 5, 10)


@dataclass
class PairedRecall:
    """Recall@k (fractions in [0, 1]) in both directions, with the numbers of images and captions evaluated."""

    image_to_text: dict[int, float]  # k -> recall@k
    text_to_image: dict[int, float]
    images: int
    texts: int

    def summary(self) -> str:
        """Three lines for the user: recall@k each way, then the counts."""
        fmt = lambda r: "  ".join(f"R@{k} {v:.4f}" for k, v in r.items())  # noqa: E731
        return f"image->text {fmt(self.image_to_text)}\ntext->image {fmt(self.text_to_image)}\n({self.images} images, {self.texts} captions)"


def recall_at_k(I: np.ndarray, positives: Sequence[Iterable[int]], ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """For ranked result ids `I` (nq, >= max(ks)) and the true ids of each query, the fraction of
    queries with at least one true id among their first k results, for each k in `ks`."""
    I = np.asarray(I)
    if I.ndim != 2 or len(I) != len(positives):
        raise ValueError(f"I must be (nq, k) with one set of positives per query, got {I.shape} and {len(positives)}")
    if max(ks) > I.shape[1]:
        raise ValueError(f"recall@{max(ks)} needs at least {max(ks)} results per query, got {I.shape[1]}")
    # first[i]: rank of the first true result of query i (a large number if none is found)
    first = np.full(len(I), np.iinfo(np.int64).max)
    for i, (row, true) in enumerate(zip(I, positives)):
        ranks = np.nonzero(np.isin(row, np.fromiter(true, dtype=np.int64)))[0]
        if len(ranks):
            first[i] = ranks[0]
    return {int(k): float((first < k).mean()) if len(first) else 0.0 for k in ks}


def paired_recall(
    image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: Sequence[int], ks: Sequence[int] = DEFAULT_KS
) -> PairedRecall:
    """Recall@k both ways; `text_to_image[j]` is the image that caption j describes."""
    import faiss

    xb_images = np.ascontiguousarray(image_embeds, dtype=np.float32)
    xb_texts = np.ascontiguousarray(text_embeds, dtype=np.float32)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if len(text_to_image) != len(xb_texts) or (len(text_to_image) and text_to_image.max() >= len(xb_images)):
        raise ValueError("text_to_image must give, for every caption, the index of an image")
    k = max(ks)
    _, I_t2i = faiss.knn(xb_texts, xb_images, min(k, len(xb_images)), metric=faiss.METRIC_INNER_PRODUCT)
    _, I_i2t = faiss.knn(xb_images, xb_texts, min(k, len(xb_texts)), metric=faiss.METRIC_INNER_PRODUCT)
    captions_of: list[list[int]] = [[] for _ in range(len(xb_images))]
    for j, i in enumerate(text_to_image):
        captions_of[i].append(j)
    return PairedRecall(
        image_to_text=recall_at_k(_pad(I_i2t, k), captions_of, ks),
        text_to_image=recall_at_k(_pad(I_t2i, k), [[i] for i in text_to_image], ks),
        images=len(xb_images),
        texts=len(xb_texts),
    )


def evaluate_pairs(
    model: CLIP,
    source: Any,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    **source_options: Any,
) -> PairedRecall:
    """Recall@k of `model` on a table (or dataset) of image-caption rows; rows sharing an image give it
    several captions. Unreadable images are left out with their captions (and logged)."""
    rows = open_source(source, modality="text", **source_options)
    firsts = rows.first_of_each_image()
    images = embed_images(
        model, [rows.images[i] for i in firsts], batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    readable = {rows.paths[firsts[i]]: j for j, i in enumerate(images.indices.tolist())}
    keep = [j for j, p in enumerate(rows.paths) if p in readable]
    texts = embed_texts(model, [rows.captions[j] for j in keep])
    return paired_recall(images.embeddings.numpy(), texts.numpy(), [readable[rows.paths[j]] for j in keep], ks)


def _pad(I: np.ndarray, k: int) -> np.ndarray:
    """Pads results to k columns with -1 (a collection smaller than k)."""
    return I if I.shape[1] >= k else np.pad(I, ((0, 0), (0, k - I.shape[1])), constant_values=-1)
