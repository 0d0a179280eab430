"""Evaluation on the user's own data during training: zero-shot classification and retrieval."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from vlm.embed import embed_images, embed_texts
from vlm.metrics import positives_from_ids, retrieval_recall, topk_accuracy
from vlm.model import CLIP

from .config import TrainConfig
from .sources import Record, open_pairs, open_source

__all__ = [
    "ZeroShotSet",
    "RetrievalSet",
    "EvalSets",
    "load_eval_sets",
    "zeroshot_metrics",
    "retrieval_metrics",
    "text_classifier",
]

logger = logging.getLogger(__name__)


@dataclass
class ZeroShotSet:
    """A labelled image set for zero-shot top-k accuracy, with the class names and prompt templates."""

    images: list[Any]
    labels: Tensor  # (N,) class indices
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


@dataclass
class RetrievalSet:
    """Image-caption pairs for image-to-text and text-to-image recall@k."""

    images: list[Any]
    captions: list[str]  # one per image


@dataclass
class EvalSets:
    """The evaluation sets a run was given; false when it has none."""

    zeroshot: ZeroShotSet | None = None
    retrieval: RetrievalSet | None = None

    def __bool__(self) -> bool:
        return self.zeroshot is not None or self.retrieval is not None


def _label_indices(records: list[Record], classnames: tuple[str, ...], spec: str) -> Tensor:
    """Labels as class indices: a class name, or an integer index into `classnames` (e.g. "7" in a CSV)."""
    index = {name: i for i, name in enumerate(classnames)}
    labels = []
    for r in records:
        key = str(r.label)
        if key in index:
            labels.append(index[key])
        elif key.isdigit() and int(key) < len(classnames):
            labels.append(int(key))
        else:
            raise ValueError(
                f"{spec}: label {r.label!r} of {r.name} is neither one of eval.classnames {list(classnames)} nor "
                "an index into them; fix eval.classnames, or leave it empty to use the labels found in the data"
            )
    return torch.tensor(labels, dtype=torch.long)


def load_eval_sets(config: TrainConfig) -> EvalSets:
    """The labelled set (eval.zeroshot) and the held-out pairs (data.eval) the config names."""
    sets = EvalSets()
    ev, data = config.eval, config.data
    if ev.zeroshot:
        source = open_source(
            ev.zeroshot,
            image_column=data.image_column,
            label_column=ev.label_column,
            need_text=False,
            split=data.eval_split,
            image_root=data.image_root,
        )
        records = source.records(ev.max_samples)
        classnames = ev.classnames or tuple(sorted({str(r.label) for r in records}))
        labels = _label_indices(records, classnames, ev.zeroshot)
        sets.zeroshot = ZeroShotSet([r.image for r in records], labels, classnames, ev.templates)
        logger.info(
            "zero-shot set: %d images, %d classes, %d templates", len(records), len(classnames), len(ev.templates)
        )
    if data.eval:
        records = [
            r
            for r in open_pairs(data, held_out=True).records(ev.max_samples)
            if isinstance(r.text, str) and r.text.strip()
        ]
        sets.retrieval = RetrievalSet([r.image for r in records], [r.text for r in records])
        logger.info("retrieval set: %d image-caption pairs", len(records))
    return sets


def text_classifier(model: CLIP, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, E) normalised class embeddings: the mean of each class's normalised prompt embeddings."""
    from vlm.zeroshot import build_classifier

    return build_classifier(model, list(classnames), list(templates)).weights


def zeroshot_metrics(
    model: CLIP, data: ZeroShotSet, *, batch_size: int = 256, num_workers: int = 0
) -> dict[str, float]:
    """Zero-shot top-1 (and top-5 with at least 5 classes) accuracy of `model` on `data`, as fractions
    in [0, 1] keyed ``zeroshot_top1``/``zeroshot_top5``; unreadable images are left out."""
    classifier = text_classifier(model, data.classnames, data.templates)
    emb = embed_images(model, data.images, batch_size=batch_size, num_workers=num_workers, progress=False)
    scores = emb.embeddings @ classifier.T  # (N_ok, C)
    ks = (1, 5) if len(data.classnames) >= 5 else (1,)
    acc = topk_accuracy(scores, data.labels[emb.indices], ks)
    return {f"zeroshot_top{k}": v for k, v in acc.items()}


def retrieval_metrics(
    model: CLIP, data: RetrievalSet, *, batch_size: int = 256, num_workers: int = 0
) -> dict[str, float]:
    """Recall@1/5/10 both ways. Identical captions are one text whose positives are all their images."""
    unique = sorted(set(data.captions))
    caption_id = {c: i for i, c in enumerate(unique)}
    emb = embed_images(model, data.images, batch_size=batch_size, num_workers=num_workers, progress=False)
    image_caption = torch.tensor([caption_id[data.captions[i]] for i in emb.indices.tolist()], dtype=torch.long)
    present = torch.unique(image_caption)  # captions whose images all failed to load have no positive
    texts = embed_texts(model, [unique[i] for i in present.tolist()])
    recall = retrieval_recall(emb.embeddings, texts, positives_from_ids(image_caption, present))
    return recall.as_dict()
