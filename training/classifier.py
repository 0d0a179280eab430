"""The fine-tuned classifier: an image tower and a linear head, its zero-shot start, its data and its
evaluation.

`ImageClassifier` is the image tower followed by a linear head over the L2-normalised embedding. The
head can start from the zero-shot classifier (`zeroshot_head`: class-prompt text embeddings scaled by
`logit_scale`, so that before training it predicts exactly what zero-shot predicts). Images are decoded
once into memory (`load_images`, digits-sized data).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.config import CLIPConfig
from vlm.data import FailureLog, iter_image_batches
from vlm.data import LabelledImages
from vlm.evaluation import Metrics, compute_metrics
from vlm.model import CLIP
from vlm.transforms import image_transform
from vlm.vision import VisionTower

__all__ = [
    "ImageClassifier",
    "zeroshot_head",
    "LoadedImages",
    "load_images",
    "predict_logits",
    "evaluate_classifier",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "image_classifier.json"
ARTIFACT_TYPE = "vlm-image-classifier"


# ---- the classifier -------------------------------------------------------------------------------
class ImageClassifier(nn.Module):
    """Image tower + linear head over the normalised embedding: images (B, 3, H, W) -> logits (B, C)."""

    def __init__(self, clip_config: CLIPConfig, class_names: Sequence[str], image_size: int | None = None) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("a classifier needs at least one class name")
        self.clip_config = clip_config
        # The resolution it was fine-tuned at (the tower's own unless trained at a new one).
        self.image_size = image_size or clip_config.vision.image_size
        self.class_names = tuple(class_names)
        self.visual = VisionTower(clip_config.vision, clip_config.embed_dim)
        self.head = nn.Linear(clip_config.embed_dim, len(self.class_names))

    @classmethod
    def from_clip(cls, model: CLIP, class_names: Sequence[str]) -> "ImageClassifier":
        """A classifier whose tower is a copy of `model.visual` (the head is random until set)."""
        classifier = cls(model.config, class_names)
        classifier.visual.load_state_dict(model.visual.state_dict())
        return classifier

    def features(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> L2-normalised image embeddings (B, E)."""
        return F.normalize(self.visual(images), dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) -> class logits (B, C) (softmax them for probabilities)."""
        return self.head(self.features(images))

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (class token, position embeddings)."""
        return {f"visual.{n}" for n in self.visual.no_weight_decay()}

    def into_clip(self, model: CLIP) -> CLIP:
        """`model` with its image tower replaced by this one (in place), for zero-shot and search."""
        model.visual.load_state_dict(self.visual.state_dict())
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes the weights (safetensors, atomically) and the class names, resolution and CLIP config
        (JSON) to `directory`; returns it."""
        from safetensors.torch import save_file

        from vlm.files import atomic_path, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        meta = {
            "type": ARTIFACT_TYPE,
            "class_names": list(self.class_names),
            "image_size": self.image_size,
            "clip_config": self.clip_config.to_dict(),
        }
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageClassifier":
        """The classifier `save_pretrained` wrote to `directory`, in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file() and (directory / "lora_adapter.json").is_file():
            from .lora import load_lora_classifier  # `vlm finetune --mode lora` without --merge

            return load_lora_classifier(directory)
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{directory} holds no {META_FILE}; give a directory written by `vlm finetune` "
                "(ImageClassifier.save_pretrained)"
            )
        meta = json.loads(meta_path.read_text())
        classifier = cls(CLIPConfig.from_dict(meta["clip_config"]), meta["class_names"], meta.get("image_size"))
        classifier.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return classifier.eval()


@torch.no_grad()
def zeroshot_head(model: CLIP, class_names: Sequence[str], templates: str | Sequence[str] = "simple") -> nn.Linear:
    """A head equal to the zero-shot classifier: weight = logit_scale * class embeddings, bias = logit_bias."""
    from vlm.zeroshot import build_classifier

    zs = build_classifier(model, list(class_names), templates)
    head = nn.Linear(zs.weights.shape[1], zs.weights.shape[0])
    head.weight.copy_(zs.logit_scale * zs.weights)
    head.bias.fill_(zs.logit_bias or 0.0)
    return head


# ---- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedImages:
    """Decoded, transformed images (N, 3, H, W) and their labels (N,); unreadable images are left out
    and listed in `failures`."""

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    failures: FailureLog = field(default_factory=FailureLog)

    def __len__(self) -> int:
        return len(self.labels)


def load_images(
    data: LabelledImages,
    config: CLIPConfig,
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> LoadedImages:
    """Decodes every image of `data` once with the model's eval transform; broken files are counted, skipped.

    `image_size` other than the model's trains and evaluates at a new resolution: the tower resamples its
    position embeddings to the new patch grid (bicubic) on every forward."""
    vision = config.vision
    if image_size is not None:
        if image_size <= 0 or image_size % vision.patch_size:
            raise ValueError(f"image_size={image_size!r} must be a positive multiple of the patch size {vision.patch_size}")
        vision = replace(vision, image_size=image_size)
    transform = image_transform(vision, train=False)
    log = FailureLog()
    chunks, indices = [], []
    for batch in iter_image_batches(
        data.images.sources, transform, batch_size=batch_size, failure_log=log, progress=progress, desc="decode"
    ):
        if len(batch.indices):
            chunks.append(batch.images)
            indices.append(batch.indices)
    if not chunks:
        from .data_skips import UnreadableDataError, describe_failures

        raise UnreadableDataError(
            f"none of the {len(data.images)} images could be read: {describe_failures(log.failures)}; check the "
            "paths of the data (a table's relative paths resolve against its own folder)"
        )
    index = torch.cat(indices)
    labels = torch.tensor(data.labels, dtype=torch.long)[index]
    if log.count:
        logger.warning("%d of %d images could not be read and are left out", log.count, len(data.images))
    return LoadedImages(torch.cat(chunks), labels, data.class_names, log)



# ---- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(classifier: ImageClassifier, images: Tensor, batch_size: int = 256) -> Tensor:
    """Class logits (N, C) of images (N, 3, H, W), in batches, in eval mode (the mode is restored)."""
    was_training = classifier.training
    classifier.eval()
    out = torch.cat([classifier(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])
    classifier.train(was_training)
    return out


def evaluate_classifier(classifier: ImageClassifier, data: LoadedImages, batch_size: int = 256) -> Metrics:
    """Top-1, top-5, mean per-class recall and the confusion matrix of `classifier` on `data`."""
    if tuple(data.class_names) != classifier.class_names:
        raise ValueError(
            f"the data's classes {list(data.class_names)} differ from the classifier's {list(classifier.class_names)}; "
            "evaluate on data with the same class folders"
        )
    return compute_metrics(predict_logits(classifier, data.images, batch_size), data.labels, data.class_names)

