"""Evaluation on the user's own data during training: zero-shot classification and retrieval."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from vlm.data import is_tar_spec, label_ids, open_labelled
from vlm.embed import embed_images, embed_texts
from vlm.metrics import positives_from_ids, retrieval_recall, topk_accuracy
from vlm.model import CLIP

from .config import TrainConfig, setting_errors
from .remote import is_remote
from .sources import open_pairs, open_source

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


def _zeroshot_set(config: TrainConfig) -> ZeroShotSet:
    """The labelled set `eval.zeroshot` names: tar shards (labels from an integer .cls or the label
    column), a table at an fsspec URL, or anything `vlm.data.open_labelled` reads; labels by `vlm.data.label_ids`' one rule."""
    ev, data = config.eval, config.data
    class_names = ev.classnames or None
    if is_tar_spec(ev.zeroshot) or is_remote(ev.zeroshot):  # read by training's sources, not vlm's data layer
        source = open_source(ev.zeroshot, image_column=data.image_column, label_column=ev.label_column,
                             need_text=False, need_label=True)  # fmt: skip
        records = source.records(ev.max_samples)
        column = source.columns.label or "label"
        labels, names = label_ids([r.label for r in records], class_names, where=ev.zeroshot, column=column)
        return ZeroShotSet([r.image for r in records], torch.tensor(labels, dtype=torch.long), names, ev.templates)
    labelled = open_labelled(
        ev.zeroshot,
        split=data.eval_split,
        image_column=data.image_column,
        label_column=ev.label_column,
        class_names=class_names,
        image_root=data.image_root,
    )
    n = ev.max_samples or len(labelled.labels)
    labels = torch.tensor(labelled.labels[:n], dtype=torch.long)
    images = [labelled.images.sources[i] for i in range(len(labels))]
    return ZeroShotSet(images, labels, labelled.class_names, ev.templates)


def load_eval_sets(config: TrainConfig) -> EvalSets:
    """The labelled set (eval.zeroshot) and the held-out pairs (data.eval) the config names."""
    sets = EvalSets()
    ev, data = config.eval, config.data
    if ev.zeroshot:
        with setting_errors("eval.zeroshot", ev.zeroshot):
            sets.zeroshot = z = _zeroshot_set(config)
        logger.info(
            "zero-shot set: %d images, %d classes, %d templates", len(z.images), len(z.classnames), len(z.templates)
        )
    if data.eval:
        with setting_errors("data.eval", data.eval):
            pairs = open_pairs(data, held_out=True).records(ev.max_samples)
        records = [r for r in pairs if isinstance(r.text, str) and r.text.strip()]
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
