"""Embedding many images or texts with a model, in batches, skipping unreadable images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .data import Failure, FailureLog, iter_image_batches
from .model import CLIP
from .tokenizer import get_tokenizer
from .transforms import image_transform

__all__ = ["ImageEmbeddings", "embed_images", "embed_texts"]


@dataclass
class ImageEmbeddings:
    """Embeddings of the readable images: `embeddings[j]` belongs to `sources[indices[j]]`."""

    embeddings: Tensor  # (N_ok, E), float32, L2-normalised when asked
    indices: Tensor  # (N_ok,) int64 positions in the sources
    failures: list[Failure]


def _device(model: CLIP) -> torch.device:
    return model.logit_scale.device


@torch.inference_mode()
def embed_images(
    model: CLIP,
    sources: Sequence[Any],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    normalize: bool = True,
    draft: bool = False,
    progress: bool = True,
    failure_log: FailureLog | None = None,
) -> ImageEmbeddings:
    """Embeds `sources` (paths, bytes, arrays, PIL images) with the model's own preprocessing.

    Unreadable images are skipped, logged (the first few by name) and returned in `failures`.
    `draft=True` lets JPEGs decode at a reduced scale close to the model's input size.
    """
    transform = image_transform(model)
    size = model.config.vision.image_size
    log = failure_log if failure_log is not None else FailureLog()
    chunks, indices = [], []
    for batch in iter_image_batches(
        sources,
        transform,
        batch_size=batch_size,
        num_workers=num_workers,
        draft_size=(size, size) if draft else None,
        failure_log=log,
        progress=progress,
    ):
        if len(batch.indices):
            x = batch.images.to(_device(model), model.logit_scale.dtype)
            chunks.append(model.encode_image(x, normalize=normalize).float().cpu())
            indices.append(batch.indices)
    dim = model.config.embed_dim
    return ImageEmbeddings(
        embeddings=torch.cat(chunks) if chunks else torch.zeros(0, dim),
        indices=torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long),
        failures=log.failures,
    )


@torch.inference_mode()
def embed_texts(
    model: CLIP, texts: Sequence[str], *, batch_size: int = 256, normalize: bool = True, progress: bool = False
) -> Tensor:
    """(len(texts), E) float32 embeddings. Batches are formed from texts sorted by where they are pooled,
    so that on a causal tower each runs only as many positions as its longest text needs."""
    from tqdm.auto import tqdm

    tokens = get_tokenizer(model)(list(texts))
    if not len(tokens):
        return torch.zeros(0, model.config.embed_dim)
    order = model.text.pool_positions(tokens).argsort()
    out = torch.empty(len(tokens), model.config.embed_dim)
    with tqdm(total=len(tokens), desc="texts", unit="text", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(tokens), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = model.encode_text(tokens[idx].to(_device(model)), normalize=normalize).float().cpu()
            bar.update(len(idx))
    return out
