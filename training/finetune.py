"""Fine-tuning a CLIP image tower for classification, without losing what zero-shot knew.

The classifier is the image tower followed by a linear head over the L2-normalised embedding. The head
starts from the zero-shot classifier (class-prompt text embeddings scaled by `logit_scale`, so that
before training it predicts exactly what zero-shot predicts), from a linear probe, or at random.

Modes:
- ``linear-probe``: image features are computed once and cached; only the head trains, on the cache;
- ``full``: every weight of the tower and the head trains (optionally only the last N blocks);
- ``lp-ft``: a linear probe first, then full fine-tuning from it (Kumar et al. 2022: the probe-initialised
  head keeps the features from being distorted by a random head's early gradients).

Layer-wise learning-rate decay gives the head and the last block the full rate and each block below
`layer_decay` times the rate of the block above. WiSE-FT (Wortsman et al. 2022) interpolates the
zero-shot and fine-tuned weights: `wise_ft(a, b, alpha)` is `a` at alpha=0 and `b` at alpha=1, exactly.

Images are decoded once into memory (digits-sized data); `shift_images` gives the shifted copy
(rotated, blurred, noisy, rescaled) on which robustness is measured.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.config import CLIPConfig
from vlm.data import FailureLog, iter_image_batches
from vlm.evaluation import LabelledImages, Metrics, compute_metrics
from vlm.model import CLIP
from vlm.transforms import image_transform
from vlm.vision import VisionTower

from .config import PRECISIONS

__all__ = [
    "MODES",
    "HEAD_INITS",
    "FinetuneConfig",
    "ImageClassifier",
    "LoadedImages",
    "FinetuneResult",
    "WiseFTPoint",
    "load_images",
    "zeroshot_head",
    "fit_linear_head",
    "layer_decay_groups",
    "finetune",
    "wise_ft",
    "wise_ft_sweep",
    "shift_images",
    "augment_params",
    "augment_images",
    "evaluate_classifier",
    "predict_logits",
    "save_sweep_png",
    "sweep_to_json",
]

logger = logging.getLogger(__name__)

MODES = ("linear-probe", "full", "lp-ft", "flyp")
HEAD_INITS = ("zeroshot", "probe", "random")
WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "image_classifier.json"
ARTIFACT_TYPE = "vlm-image-classifier"


# ---- config ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. `epochs` counts passes over the training images for the tower (full, lp-ft);
    `probe_steps` counts full-batch steps of the head on cached features (linear-probe, lp-ft's first stage)."""

    mode: str = "full"
    head_init: str = "zeroshot"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 10
    layer_decay: float = 1.0
    label_smoothing: float = 0.0
    unlocked_blocks: int | None = None  # None: every block trains; N: only the last N
    ema_decay: float = 0.0  # 0: no weight EMA; e.g. 0.999 keeps an EMA of the weights and returns it
    mixup_alpha: float = 0.0  # 0: no mixup; > 0: mix image pairs with a Beta(alpha, alpha) coefficient
    cutmix_alpha: float = 0.0  # 0: no cutmix; > 0: paste boxes of Beta(alpha, alpha)-drawn area (with mixup: either, per step)
    augment: bool = False  # random rotation, scale and shift of every training image (see augment_params)
    mixed_precision: str = "auto"  # "auto": bf16/fp16 on GPU, fp32 on CPU; or "no", "bf16", "fp16"
    probe_steps: int = 300
    probe_lr: float = 1e-2
    probe_weight_decay: float = 0.0
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}; pick one of them")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init={self.head_init!r} is not one of {HEAD_INITS}; pick one of them")
        for name in ("epochs", "batch_size", "probe_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "probe_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] (1 = no decay; 0.75 is usual), got {self.layer_decay!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off, 0.999 is usual), got {self.ema_decay!r}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 = off, 0.2 is usual), got {self.mixup_alpha!r}")
        if self.cutmix_alpha < 0:
            raise ValueError(f"cutmix_alpha must be >= 0 (0 = off, 1.0 is usual), got {self.cutmix_alpha!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of {PRECISIONS}; pick one of them")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.unlocked_blocks is not None and self.unlocked_blocks < 0:
            raise ValueError(f"unlocked_blocks must be >= 0 or None (all blocks), got {self.unlocked_blocks!r}")


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
        raise ValueError(f"none of the {len(data.images)} images could be read; see the failures logged above")
    index = torch.cat(indices)
    labels = torch.tensor(data.labels, dtype=torch.long)[index]
    if log.count:
        logger.warning("%d of %d images could not be read and are left out", log.count, len(data.images))
    return LoadedImages(torch.cat(chunks), labels, data.class_names, log)


def shift_images(images: Tensor, *, seed: int = 0) -> Tensor:
    """The shifted copy: a quarter of the images each rotated (±20°), blurred, noised, or rescaled (shrunk
    to 60% and padded back), deterministically by `seed`. Works on normalised tensors (B, 3, H, W)."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    kind = torch.arange(len(images)) % 4
    H, W = images.shape[-2:]
    for i in range(len(images)):
        x = images[i]
        fill = [float(v) for v in x[:, 0, 0]]  # the corner colour: the background
        if kind[i] == 0:
            angle = float(torch.empty(1).uniform_(15, 25, generator=g)) * (1 if i % 8 < 4 else -1)
            out[i] = TF.rotate(x, angle, fill=fill)
        elif kind[i] == 1:
            out[i] = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.2, 1.2])
        elif kind[i] == 2:
            out[i] = x + 0.5 * torch.randn(x.shape, generator=g)
        else:
            h, w = max(1, int(H * 0.6)), max(1, int(W * 0.6))
            small = TF.resize(x, [h, w], antialias=True)
            top, left = (H - h) // 2, (W - w) // 2
            out[i] = torch.tensor(fill).view(3, 1, 1).expand(3, H, W).clone()
            out[i, :, top : top + h, left : left + w] = small
    return out


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


# ---- linear probe ---------------------------------------------------------------------------------
@torch.no_grad()
def _features(classifier: ImageClassifier, images: Tensor, batch_size: int = 256) -> Tensor:
    classifier.eval()
    return torch.cat([classifier.features(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])


def fit_linear_head(head: nn.Linear, features: Tensor, labels: Tensor, config: FinetuneConfig) -> nn.Linear:
    """Trains `head` in place on cached `features` (N, E): full-batch AdamW for `config.probe_steps` steps.

    The torch head of the ``linear-probe`` and ``lp-ft`` modes. The scikit-learn baseline that
    `vlm eval zeroshot` reports beside zero-shot is `vlm.evaluation.sklearn_linear_probe`, another estimator."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.probe_lr, weight_decay=config.probe_weight_decay)
    for _ in range(config.probe_steps):
        loss = F.cross_entropy(head(features), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    logger.info("linear probe: final training loss %.4f", float(loss.detach()))
    return head


# ---- layer decay ----------------------------------------------------------------------------------
def _layer_id(name: str, depth: int) -> int:
    """0 for the embedding (patches, class token, positions, pre-norm), i + 1 for block i, depth + 1 above."""
    if name.startswith("visual.transformer.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith(("visual.patch_embed", "visual.class_token", "visual.pos_embed", "visual.norm_pre")):
        return 0
    return depth + 1


def layer_decay_groups(classifier: ImageClassifier, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups: the lr of layer l is `lr * layer_decay ** (depth + 1 - l)`; weight decay follows the
    training rule (`training.optim.param_groups`: only weights with ndim >= 2 outside `no_weight_decay`)."""
    depth = len(classifier.visual.transformer.blocks)
    skip = classifier.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in classifier.named_parameters():
        if not param.requires_grad:
            continue
        layer = _layer_id(name, depth)
        decay = param.ndim >= 2 and name not in skip
        group = groups.setdefault(
            (layer, decay),
            {"params": [], "names": [], "lr": lr * layer_decay ** (depth + 1 - layer), "weight_decay": weight_decay if decay else 0.0},
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _freeze_blocks(classifier: ImageClassifier, unlocked_blocks: int | None) -> None:
    if unlocked_blocks is None:
        return
    blocks = classifier.visual.transformer.blocks
    if unlocked_blocks > len(blocks):
        raise ValueError(f"unlocked_blocks={unlocked_blocks} but the image tower has {len(blocks)} blocks; use at most {len(blocks)}")
    classifier.visual.requires_grad_(False)
    for module in [*blocks[len(blocks) - unlocked_blocks :], *classifier.visual.head_modules()]:
        module.requires_grad_(True)


# ---- fine-tuning ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned classifier and its training-loss history (one global-batch value per optimiser step)."""

    classifier: ImageClassifier
    losses: list[float]


def _init_head(classifier: ImageClassifier, model: CLIP, train: LoadedImages, config: FinetuneConfig, templates) -> None:
    needs_probe = config.mode in ("linear-probe", "lp-ft") or config.head_init == "probe"
    if config.head_init == "zeroshot":
        classifier.head.load_state_dict(zeroshot_head(model, classifier.class_names, templates).state_dict())
    if needs_probe:
        features = _features(classifier, train.images)  # computed once: the cache the probe trains on
        fit_linear_head(classifier.head, features, train.labels, config)


def finetune(
    model: CLIP,
    train: LoadedImages,
    config: FinetuneConfig,
    *,
    templates: str | Sequence[str] = "simple",
    checkpoint_dir: str | os.PathLike | None = None,
) -> FinetuneResult:
    """Fine-tunes a copy of `model`'s image tower on `train` as `config.mode` says; `model` is not changed.

    The tower trains through accelerate: under `accelerate launch` (or torchrun) every process takes its
    share of each global batch of `config.batch_size` images and the gradients are those of the whole
    batch. With `checkpoint_dir`, training is checkpointed after every epoch, and a rerun with the same
    arguments resumes from the last one to the same weights an uninterrupted run reaches.
    """
    torch.manual_seed(config.seed)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if config.mode == "flyp":
        return _finetune_flyp(model, train, config, templates, checkpoint_dir)
    classifier = ImageClassifier.from_clip(model, train.class_names)
    _init_head(classifier, model, train, config, templates)
    if config.mode == "linear-probe":
        return FinetuneResult(classifier.eval(), [])
    _freeze_blocks(classifier, config.unlocked_blocks)
    groups = layer_decay_groups(classifier, config.lr, config.layer_decay, config.weight_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    losses = _train(classifier, optimizer, train, config, _classifier_step(train, config), checkpoint_dir)
    return FinetuneResult(classifier.eval(), losses)


def _finetune_flyp(
    model: CLIP, train: LoadedImages, config: FinetuneConfig, templates, checkpoint_dir: Path | None
) -> FinetuneResult:
    """FLYP (Goyal et al. 2023): fine-tune both towers of a copy of `model` with its own contrastive loss
    against class-prompt captions, then classify with the zero-shot head the tuned text tower gives."""
    import copy

    from .config import OptimConfig
    from .optim import build_optimizer, clamp_logit_scale

    clip = copy.deepcopy(model).train()
    clip.requires_grad_(True)
    optimizer = build_optimizer(clip, OptimConfig(lr=config.lr, weight_decay=config.weight_decay))
    step = _flyp_step(clip, train, config, templates)
    losses = _train(clip, optimizer, train, config, step, checkpoint_dir, after_update=clamp_logit_scale)
    clip.eval()
    classifier = ImageClassifier.from_clip(clip, train.class_names)
    classifier.head.load_state_dict(zeroshot_head(clip, train.class_names, templates).state_dict())
    return FinetuneResult(classifier.eval(), losses)


# A step function runs forward and backward on this process's rows of one global batch and returns the
# global batch's loss: step(model, accelerator, batch) -> float.
@dataclass(frozen=True)
class _Batch:
    step: int  # optimiser steps before this one
    rows: Tensor  # indices into the training images of the whole global batch
    local: Tensor  # positions in `rows` that this process computes


def _classifier_step(train: LoadedImages, config: FinetuneConfig):
    from .distributed import all_reduce_sums

    def step(model: nn.Module, accelerator, batch: _Batch) -> float:
        device = accelerator.device
        images = _train_images(train, config, batch, batch.local).to(device)
        labels = train.labels[batch.rows[batch.local]].to(device)
        # Mixup and cutmix pair each image with the one at the mirrored position of the global batch,
        # so the pairs do not depend on how the batch is split across processes.
        mirror = len(batch.rows) - 1 - batch.local
        partners = _Partners(
            lambda: _train_images(train, config, batch, mirror).to(device), train.labels[batch.rows[mirror]].to(device)
        )
        with accelerator.autocast():
            summed = _mixed_loss(model, images, labels, partners, config, batch.step)
        # DistributedDataParallel averages the processes' gradients: scaling each process's sum by
        # world / global batch makes that average the gradient of the global batch's mean loss.
        accelerator.backward(summed * (accelerator.num_processes / len(batch.rows)))
        (total,) = all_reduce_sums([float(summed.detach())], accelerator.device)
        return total / len(batch.rows)

    return step


def _flyp_step(clip: CLIP, train: LoadedImages, config: FinetuneConfig, templates):
    from vlm.templates import fill_template, resolve_templates
    from vlm.tokenizer import get_tokenizer

    from .config import LossConfig
    from .step import loss_and_gradients

    tokenizer, prompts = get_tokenizer(clip), resolve_templates(templates)
    # The text tower's negatives are the other images' captions in the whole global batch.
    loss = LossConfig(kind="clip" if clip.logit_bias is None else "siglip")

    def step(model: nn.Module, accelerator, batch: _Batch) -> float:
        images = _train_images(train, config, batch, batch.local).to(accelerator.device)
        # Templates rotate through the batch so that every wording is trained on.
        captions = [
            fill_template(prompts[(batch.step + int(j)) % len(prompts)], train.class_names[int(train.labels[batch.rows[j]])])
            for j in batch.local
        ]
        return loss_and_gradients(model, images, tokenizer(captions).to(accelerator.device), loss, accelerator).value

    return step


def _train(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: LoadedImages,
    config: FinetuneConfig,
    step_fn,
    checkpoint_dir: Path | None,
    after_update=None,
) -> list[float]:
    """The fine-tuning loop through accelerate; trains `module` in place (and leaves it on the device it
    came on) and returns the loss per step."""
    from .config import ScheduleConfig
    from .loop import NonFiniteLossError, make_accelerator
    from .optim import build_scheduler

    accelerator = make_accelerator(config.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.batch_size < world or len(train) < world:
        raise ValueError(
            f"{world} processes need at least {world} images a batch: batch_size={config.batch_size}, "
            f"{len(train)} training images; use a larger batch or fewer processes"
        )
    # An epoch's last global batch is dropped when it has fewer images than there are processes (one
    # would get none): with one process, never.
    per_epoch = len(train) // config.batch_size + (len(train) % config.batch_size >= world)
    steps = config.epochs * per_epoch
    scheduler = build_scheduler(optimizer, ScheduleConfig(steps=steps, warmup_steps=min(config.warmup_steps, steps - 1)))
    g = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    ema = {k: v.detach().clone() for k, v in module.state_dict().items()} if config.ema_decay else None
    key = _run_key(module, train, config)
    start = _resume(checkpoint_dir, key, module, optimizer, scheduler, g, losses, ema)
    home = next(module.parameters()).device
    model, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    model.train()
    bar = _bar(steps, config.progress and accelerator.is_main_process, initial=len(losses))
    for epoch in range(start, config.epochs):
        order = torch.randperm(len(train), generator=g)
        for s in range(0, per_epoch * config.batch_size, config.batch_size):
            rows = order[s : s + config.batch_size]
            local = torch.arange(rank, len(rows), world)
            optimizer.zero_grad(set_to_none=True)
            loss = step_fn(model, accelerator, _Batch(len(losses), rows, local))
            if not math.isfinite(loss):  # the global batch's loss: every process stops here alike
                raise NonFiniteLossError(
                    f"the fine-tuning loss is {loss} at step {len(losses)}; no update was made. Lower the "
                    f"learning rate (lr={config.lr}) or look for broken images"
                )
            optimizer.step()
            scheduler.step()
            if after_update is not None:
                after_update(module)
            losses.append(loss)
            if ema is not None:
                _update_ema(ema, module, config.ema_decay)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
        if checkpoint_dir is not None:
            if accelerator.is_main_process:
                _save_epoch(checkpoint_dir, epoch + 1, module, optimizer, scheduler, g, losses, ema, key)
            accelerator.wait_for_everyone()
    if bar is not None:
        bar.close()
    # prepare() moved the module to the accelerator's device and, with mixed precision, wrapped its
    # forward in autocast: undo both, so the result evaluates and mixes (WiSE-FT) like any model.
    accelerator.unwrap_model(model, keep_fp32_wrapper=False).to(home)
    if ema is not None:
        module.load_state_dict(ema)
    return losses


def _run_key(module: nn.Module, train: LoadedImages, config: FinetuneConfig) -> dict:
    """What a checkpoint must agree on to be resumed: the settings, the model kind and the data's size
    and classes (the progress bar aside)."""
    settings = {k: v for k, v in asdict(config).items() if k != "progress"}
    return {"config": settings, "module": type(module).__name__, "images": len(train), "classes": list(train.class_names)}


# ---- augmentation and mixing ----------------------------------------------------------------------
def _train_images(train: LoadedImages, config: FinetuneConfig, batch: _Batch, positions: Tensor) -> Tensor:
    """The images at `positions` of the global batch, augmented when `config.augment` is on."""
    images = train.images[batch.rows[positions]]
    if not config.augment:
        return images
    # Drawn for the whole global batch from (seed, step): the same image gets the same change whatever
    # the number of processes, and a resumed run draws what the uninterrupted one drew.
    params = augment_params(len(batch.rows), seed=config.seed, step=batch.step)
    return augment_images(images, params[positions])


@dataclass(frozen=True)
class _Partners:
    """The images (built only when mixing needs them) and labels each image of a batch is mixed with."""

    images: Callable[[], Tensor]
    labels: Tensor


def augment_params(n: int, *, seed: int, step: int) -> Tensor:
    """Random affine parameters for `n` images, (n, 4): rotation in degrees (±10), scale (0.9-1.1), and
    horizontal and vertical shift as fractions of the side (±0.08); deterministic in (seed, step)."""
    rng = np.random.default_rng((seed, step, 1))
    return torch.tensor(
        np.stack(
            [rng.uniform(-10, 10, n), rng.uniform(0.9, 1.1, n), rng.uniform(-0.08, 0.08, n), rng.uniform(-0.08, 0.08, n)],
            axis=1,
        ),
        dtype=torch.float32,
    )


def augment_images(images: Tensor, params: Tensor) -> Tensor:
    """Applies `augment_params` rows (n, 4) to normalised images (n, 3, H, W), bilinearly. Pixels that
    come from outside the image repeat its edge (the background, for digits and most photos)."""
    H, W = images.shape[-2:]
    angle, scale, dx, dy = (torch.as_tensor(c, dtype=images.dtype) for c in params.T)
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # The inverse map, output -> input pixel, in grid_sample's [-1, 1] coordinates (scaled per axis so
    # that a rotation stays a rotation on non-square images).
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin * H / W
    theta[:, 1, 0], theta[:, 1, 1] = -sin * W / H, cos
    shift = torch.stack([2 * dx, 2 * dy], dim=1)
    theta[:, :, 2] = -(theta[:, :, :2] @ shift.unsqueeze(-1)).squeeze(-1)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _mixed_loss(
    classifier: nn.Module, images: Tensor, labels: Tensor, partners: _Partners, config: FinetuneConfig, step: int
) -> Tensor:
    """The summed cross-entropy (with label smoothing) of the batch, on images mixed with their
    `partners` (mixup or cutmix) when those are on."""
    ce = partial(F.cross_entropy, label_smoothing=config.label_smoothing, reduction="sum")
    use_mixup, use_cutmix = config.mixup_alpha > 0, config.cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return ce(classifier(images), labels)
    # Drawn from (seed, step), not from a running generator: a resumed run draws the same ones.
    rng = np.random.default_rng((config.seed, step))
    cutmix = use_cutmix and (not use_mixup or rng.random() < 0.5)  # both on: one or the other, as timm does
    lam = float(rng.beta(*(2 * [config.cutmix_alpha if cutmix else config.mixup_alpha])))
    other = partners.images()
    if cutmix:
        images, lam = _cutmix(images, other, lam, rng)
    else:
        images = lam * images + (1 - lam) * other
    logits = classifier(images)
    return lam * ce(logits, labels) + (1 - lam) * ce(logits, partners.labels)


def _cutmix(images: Tensor, other: Tensor, lam: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """Pastes a box of (1 - lam) of the area from `other` into `images` (Yun et al. 2019); returns the
    mixed images and lam corrected to the box's real area after clipping at the border."""
    H, W = images.shape[-2:]
    cut = math.sqrt(1 - lam)
    h, w = int(H * cut), int(W * cut)
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    top, bottom = max(cy - h // 2, 0), min(cy + h // 2, H)
    left, right = max(cx - w // 2, 0), min(cx + w // 2, W)
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (H * W)


@torch.no_grad()
def _update_ema(ema: dict[str, Tensor], module: nn.Module, decay: float) -> None:
    # The EMA stays where it was made (the CPU) while the module trains on the accelerator's device.
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v.detach().to(ema[k].device, ema[k].dtype), 1 - decay)
        else:
            ema[k].copy_(v)


# A checkpoint after every epoch: the weights, optimiser and schedule, the shuffling generator and the
# losses so far. Written to a temporary name and renamed, so a kill leaves the previous one whole.
CHECKPOINT_FILE = "finetune_state.pt"


def _save_epoch(
    directory: Path,
    epoch: int,
    module: nn.Module,
    optimizer,
    scheduler,
    g: torch.Generator,
    losses: list[float],
    ema=None,
    key: dict | None = None,
) -> Path:
    from vlm.files import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": epoch,
        "run": json.dumps(key, sort_keys=True),
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": g.get_state(),
        "losses": list(losses),
        "ema": ema,
    }
    with atomic_path(directory / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    logger.info("fine-tune checkpoint saved after epoch %d: %s", epoch, directory / CHECKPOINT_FILE)
    return directory / CHECKPOINT_FILE


def _resume(
    directory: Path | None, key: dict, module: nn.Module, optimizer, scheduler, g: torch.Generator, losses: list[float], ema=None
) -> int:
    """Restores the last epoch's checkpoint if `directory` holds one; returns the epoch to start at.
    A checkpoint of another run (other settings, model kind or data) is refused, not resumed."""
    path = Path(directory) / CHECKPOINT_FILE if directory is not None else None
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = json.loads(state.get("run") or "null")
    if saved != json.loads(json.dumps(key, sort_keys=True)):
        changed = sorted(k for k in set(saved or {}) | set(key) if (saved or {}).get(k) != key.get(k))
        raise ValueError(
            f"{path} is the checkpoint of a different fine-tuning run (it differs in: {', '.join(changed)}); "
            f"delete {path.parent} to start afresh, or write to another --output"
        )
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    g.set_state(state["generator"])
    losses.extend(state["losses"])
    if ema is not None:
        ema.update(state["ema"])
    logger.info("resumed fine-tuning from %s after epoch %d", path, state["epoch"])
    return int(state["epoch"])


def _bar(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fine-tune", unit="step")


# ---- WiSE-FT --------------------------------------------------------------------------------------
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


def save_sweep_png(points: Sequence[WiseFTPoint], path: str | os.PathLike) -> Path:
    """Accuracy (x) vs robustness (y), one labelled point per coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p.accuracy for p in points], [p.robustness for p in points], "o-")
    for p in points:
        ax.annotate(f"{p.alpha:g}", (p.accuracy, p.robustness), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("top-1, held-out split")
    ax.set_ylabel("top-1, shifted copy")
    ax.set_title("WiSE-FT sweep (label: coefficient)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_to_json(points: Sequence[WiseFTPoint]) -> list[dict]:
    """The sweep as a list of {alpha, accuracy, robustness} dicts."""
    return [asdict(p) for p in points]
