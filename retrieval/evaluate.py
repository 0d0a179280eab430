"""Image-text retrieval recall@k of a paired collection (images with one or more captions each).

The CLIP paper's definition: a query counts as a hit at k if *any* of its true pairs is among its first
k results. Text-to-image: each caption has one true image. Image-to-text: each image has all its
captions as true pairs. Search is exact (FAISS flat inner product on L2-normalised embeddings).

The metric itself is `vlm.metrics.recall_at_k_from_ids`, with the library's one tie rule: a caption or
image scoring the same as the first true one counts ahead of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vlm.embed import embed_images, embed_texts
from vlm.metrics import recall_at_k_from_ids
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


# The name retrieval's recall had before it moved to the core.
recall_at_k = recall_at_k_from_ids


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
    captions_of: list[list[int]] = [[] for _ in range(len(xb_images))]
    for j, i in enumerate(text_to_image):
        captions_of[i].append(j)
    most_captions = max(map(len, captions_of), default=0)
    # max(ks) + the number of true results: enough to see every tie with the first true result (see
    # recall_at_k_from_ids).
    D_t2i, I_t2i = faiss.knn(xb_texts, xb_images, min(k + 1, len(xb_images)), metric=faiss.METRIC_INNER_PRODUCT)
    D_i2t, I_i2t = faiss.knn(
        xb_images, xb_texts, min(k + most_captions, len(xb_texts)), metric=faiss.METRIC_INNER_PRODUCT
    )
    D_i2t, I_i2t = _pad(D_i2t, I_i2t, k)
    D_t2i, I_t2i = _pad(D_t2i, I_t2i, k)
    return PairedRecall(
        image_to_text=recall_at_k_from_ids(I_i2t, captions_of, ks, D=D_i2t),
        text_to_image=recall_at_k_from_ids(I_t2i, [[i] for i in text_to_image], ks, D=D_t2i),
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


def _pad(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads results to k columns, ids with -1 and scores with -inf (a collection smaller than k)."""
    if I.shape[1] >= k:
        return D, I
    width = ((0, 0), (0, k - I.shape[1]))
    return np.pad(D, width, constant_values=-np.inf), np.pad(I, width, constant_values=-1)
