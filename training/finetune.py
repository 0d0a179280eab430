"""Fine-tuning a CLIP image tower for classification, without losing what zero-shot knew.

The classifier (`training.classifier.ImageClassifier`) is the image tower followed by a linear head
over the L2-normalised embedding. The head starts from the zero-shot classifier, from a linear probe,
or at random (`recipe.head_init`).

Modes (`recipe.mode`):
- ``linear-probe``: image features are computed once and cached; only the head trains, on the cache;
- ``full``: every weight of the tower and the head trains (only the last N blocks with
  `model.unlocked_blocks`, by the locking rule of `vlm train`);
- ``lp-ft``: a linear probe first, then full fine-tuning from it (Kumar et al. 2022: the probe-initialised
  head keeps the features from being distorted by a random head's early gradients);
- ``flyp``: both towers train with the model's own contrastive loss against class-prompt captions
  (Goyal et al. 2023), and the tuned text tower gives the zero-shot head.

The tower trains in `training.finetune_loop`, on the accelerator, optimiser groups (weight decay and
layer-wise lr decay), schedule and checkpoints of contrastive training. WiSE-FT is `training.wise_ft`;
the whole job (data, sweep, saving) is `training.finetune_job.run_finetune`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.model import CLIP

from .augment import Partners, augment_images, augment_params, mixed_loss
from .classifier import ImageClassifier, LoadedImages, zeroshot_head
from .finetune_config import FinetuneConfig, RecipeConfig
from .finetune_loop import Batch, StepFn, run_epochs
from .optim import build_optimizer, clamp_logit_scale, lock_image_tower

__all__ = ["FinetuneResult", "finetune", "fit_linear_head"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned classifier and its training-loss history (one global-batch value per optimiser step)."""

    classifier: ImageClassifier
    losses: list[float]
    # recipe.mode=lora: the trained adapter and head weights (`training.lora`); None in other modes.
    adapters: dict[str, Tensor] | None = None


def finetune(
    model: CLIP, train: LoadedImages, config: FinetuneConfig, *, run_dir: str | os.PathLike | None = None
) -> FinetuneResult:
    """Fine-tunes a copy of `model`'s image tower on `train` as `config.recipe.mode` says; `model` is not
    changed. The config's `model` and `data` sections are the job's (`run_finetune`), not read here.

    With `run_dir`, training is checkpointed after every epoch under run_dir/checkpoints, and a rerun
    with the same arguments resumes from the last one to the weights an uninterrupted run reaches.
    """
    torch.manual_seed(config.seed)
    run_dir = Path(run_dir) if run_dir is not None else None
    if config.recipe.mode == "flyp":
        return _finetune_flyp(model, train, config, run_dir)
    if config.recipe.mode == "lora":
        from .lora import finetune_lora

        return finetune_lora(model, train, config, run_dir)
    classifier = ImageClassifier.from_clip(model, train.class_names)
    _init_head(classifier, model, train, config.recipe)
    if config.recipe.mode == "linear-probe":
        return FinetuneResult(classifier.eval(), [])
    _lock(classifier, config)
    optimizer = build_optimizer(classifier, config.optim)
    step = _classifier_step(train, config)
    losses = run_epochs(classifier, optimizer, len(train), config, step, run_key=_run_key(classifier, train, config), run_dir=run_dir)
    return FinetuneResult(classifier.eval(), losses)


def _lock(module: nn.Module, config: FinetuneConfig) -> None:
    if config.model.unlocked_blocks is not None:
        lock_image_tower(module, config.model.unlocked_blocks)


def _run_key(module: nn.Module, train: LoadedImages, config: FinetuneConfig) -> dict:
    """What a checkpoint must agree on to be resumed: the training settings, the model kind and the data's
    size and classes (not where the run writes, how it logs, or the WiSE-FT mix chosen after it)."""
    settings = {
        "seed": config.seed,
        "mixed_precision": config.mixed_precision,
        "unlocked_blocks": config.model.unlocked_blocks,
        **{name: asdict(getattr(config, name)) for name in ("recipe", "augment", "optim")},
    }
    return {"config": settings, "module": type(module).__name__, "images": len(train), "classes": list(train.class_names)}


# ---- the head -------------------------------------------------------------------------------------
@torch.no_grad()
def _features(classifier: ImageClassifier, images: Tensor, batch_size: int = 256) -> Tensor:
    classifier.eval()
    return torch.cat([classifier.features(images[s : s + batch_size]) for s in range(0, len(images), batch_size)])


def fit_linear_head(head: nn.Linear, features: Tensor, labels: Tensor, recipe: RecipeConfig) -> nn.Linear:
    """Trains `head` in place on cached `features` (N, E): full-batch AdamW for `recipe.probe_steps` steps.

    The torch head of the ``linear-probe`` and ``lp-ft`` modes. The scikit-learn baseline that
    `vlm eval zeroshot` reports beside zero-shot is `vlm.evaluation.sklearn_linear_probe`, another estimator."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe.probe_lr, weight_decay=recipe.probe_weight_decay)
    for _ in range(recipe.probe_steps):
        loss = F.cross_entropy(head(features), labels, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    logger.info("linear probe: final training loss %.4f", float(loss.detach()))
    return head


def _init_head(classifier: ImageClassifier, model: CLIP, train: LoadedImages, recipe: RecipeConfig) -> None:
    needs_probe = recipe.mode in ("linear-probe", "lp-ft") or recipe.head_init == "probe"
    if recipe.head_init == "zeroshot":
        head = zeroshot_head(model, classifier.class_names, recipe.resolved_templates())
        classifier.head.load_state_dict(head.state_dict())
    if needs_probe:
        features = _features(classifier, train.images)  # computed once: the cache the probe trains on
        fit_linear_head(classifier.head, features, train.labels, recipe)


# ---- FLYP -----------------------------------------------------------------------------------------
def _finetune_flyp(model: CLIP, train: LoadedImages, config: FinetuneConfig, run_dir: Path | None) -> FinetuneResult:
    """FLYP: fine-tune both towers of a copy of `model` with its own contrastive loss against class-prompt
    captions, then classify with the zero-shot head the tuned text tower gives."""
    clip = copy.deepcopy(model).train()
    clip.requires_grad_(True)
    _lock(clip, config)
    optimizer = build_optimizer(clip, config.optim)
    step = _flyp_step(clip, train, config)
    key = _run_key(clip, train, config)
    losses = run_epochs(clip, optimizer, len(train), config, step, run_key=key, run_dir=run_dir, after_update=clamp_logit_scale)
    clip.eval()
    classifier = ImageClassifier.from_clip(clip, train.class_names)
    head = zeroshot_head(clip, train.class_names, config.recipe.resolved_templates())
    classifier.head.load_state_dict(head.state_dict())
    return FinetuneResult(classifier.eval(), losses)


# ---- steps ----------------------------------------------------------------------------------------
def _train_images(train: LoadedImages, config: FinetuneConfig, batch: Batch, positions: Tensor) -> Tensor:
    """The images at `positions` of the global batch, augmented when `config.augment.affine` is on."""
    images = train.images[batch.rows[positions]]
    if not config.augment.affine:
        return images
    # Drawn for the whole global batch from (seed, step): the same image gets the same change whatever
    # the number of processes, and a resumed run draws what the uninterrupted one drew.
    params = augment_params(len(batch.rows), seed=config.seed, step=batch.step)
    return augment_images(images, params[positions])


def _classifier_step(train: LoadedImages, config: FinetuneConfig) -> StepFn:
    from .distributed import all_reduce_sums

    def step(model: nn.Module, accelerator, batch: Batch) -> float:
        device = accelerator.device
        images = _train_images(train, config, batch, batch.local).to(device)
        labels = train.labels[batch.rows[batch.local]].to(device)
        # Mixup and cutmix pair each image with the one at the mirrored position of the global batch,
        # so the pairs do not depend on how the batch is split across processes.
        mirror = len(batch.rows) - 1 - batch.local
        partners = Partners(
            lambda: _train_images(train, config, batch, mirror).to(device), train.labels[batch.rows[mirror]].to(device)
        )
        with accelerator.autocast():
            summed = mixed_loss(
                model, images, labels, partners, config.augment,
                label_smoothing=config.recipe.label_smoothing, seed=config.seed, step=batch.step,
            )  # fmt: skip
        # DistributedDataParallel averages the processes' gradients: scaling each process's sum by
        # world / global batch makes that average the gradient of the global batch's mean loss.
        accelerator.backward(summed * (accelerator.num_processes / len(batch.rows)))
        (total,) = all_reduce_sums([float(summed.detach())], accelerator.device)
        return total / len(batch.rows)

    return step


def _flyp_step(clip: CLIP, train: LoadedImages, config: FinetuneConfig) -> StepFn:
    from vlm.templates import fill_template, resolve_templates
    from vlm.tokenizer import get_tokenizer

    from .config import LossConfig
    from .grad_cache import loss_and_gradients

    tokenizer, prompts = get_tokenizer(clip), resolve_templates(config.recipe.resolved_templates())
    # The text tower's negatives are the other images' captions in the whole global batch.
    loss = LossConfig(kind="clip" if clip.logit_bias is None else "siglip")

    def step(model: nn.Module, accelerator, batch: Batch) -> float:
        images = _train_images(train, config, batch, batch.local).to(accelerator.device)
        # Templates rotate through the batch so that every wording is trained on.
        captions = [
            fill_template(prompts[(batch.step + int(j)) % len(prompts)], train.class_names[int(train.labels[batch.rows[j]])])
            for j in batch.local
        ]
        return loss_and_gradients(model, images, tokenizer(captions).to(accelerator.device), loss, accelerator).value

    return step
