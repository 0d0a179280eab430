"""The fine-tuning job that `vlm finetune` and the demo run: `run_finetune(config) -> FinetuneReport`.

Opens the training and held-out data (the split convention below), fine-tunes, measures the zero-shot
and fine-tuned classifiers on the held-out split and on its shifted copy, sweeps WiSE-FT, and writes
the chosen classifier, metrics.json, sweep.png and the resolved config.yaml to `config.output_dir`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlm.data import FailureLog, LabelledImages
from vlm.evaluation import Metrics
from vlm.files import atomic_write_text
from vlm.model_card import CLASSIFICATION, ModelCard, card_for_run, write_model_card

from .classifier import ImageClassifier, LoadedImages, evaluate_classifier, load_images, zeroshot_head
from .finetune_config import FinetuneConfig

__all__ = ["ClassifierEvaluation", "FinetuneReport", "data_specs", "evaluate_saved_classifier", "run_finetune"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneReport:
    """What the job measured and wrote (accuracies are top-1 fractions)."""

    output_dir: Path  # the saved classifier, metrics.json, sweep.png, config.yaml, checkpoints/
    mode: str
    wise_ft: float  # the coefficient of the saved classifier
    zeroshot: dict[str, Metrics]  # "test" (the held-out split) and "shifted" (its shifted copy)
    finetuned: dict[str, Metrics]  # the saved classifier, on the same two
    sweep: list  # WiseFTPoint per coefficient of config.wise_ft.sweep
    skipped_images: int  # unreadable training and held-out images, left out
    losses: list[float]  # the training loss per step

    def to_dict(self) -> dict[str, Any]:
        """The content of metrics.json."""
        from .wise_ft import sweep_to_json

        return {
            "mode": self.mode,
            "wise_ft": self.wise_ft,
            "zeroshot": {k: m.to_dict() for k, m in self.zeroshot.items()},
            "finetuned": {k: m.to_dict() for k, m in self.finetuned.items()},
            "sweep": sweep_to_json(self.sweep),
            "skipped_images": self.skipped_images,
        }


def data_specs(config: FinetuneConfig) -> tuple[str, str]:
    """The training and held-out data specs: data.train and data.eval, or TRAIN/train and TRAIN/test, or
    one hf: dataset's data.split and data.eval_split."""
    data = config.data.train
    if not data:
        raise ValueError("no training data: give DATA (vlm finetune DATA ...) or data.train=FOLDER|TABLE|hf:DATASET")
    if config.data.eval is not None:
        return data, config.data.eval
    if data.startswith("hf:"):
        return data, data
    root = Path(data)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return str(root / "train"), str(root / "test")
    raise ValueError(
        f"{data} has no train/ and test/ subfolders; lay it out as {data}/{{train,test}}/<class>/<image>, "
        "or give the held-out data with --eval (data.eval: a class folder, a table or hf:DATASET)"
    )


def run_finetune(config: FinetuneConfig) -> FinetuneReport | None:
    """Runs the job `config` describes (see the module docstring) and returns its report; None on the
    other processes of a multi-process launch, where the main process alone evaluates and writes.

    Rerunning the same job after a kill resumes from the last epoch's checkpoint."""
    from vlm.checkpoint import load
    from vlm.defaults import resolve_model

    from .distributed import rank
    from .finetune import finetune
    from .wise_ft import wise_ft, wise_ft_sweep

    if not config.output_dir:
        raise ValueError("no output directory: give --output DIR (output_dir=DIR)")
    output = Path(config.output_dir)
    train_spec, test_spec = data_specs(config)
    model = load(resolve_model(config.model.name), pretrained=config.model.pretrained).eval()
    train, test, shifted = _load_data(config, model.config, train_spec, test_spec)
    if rank() == 0:
        from .config import write_config

        output.mkdir(parents=True, exist_ok=True)
        write_config(config, output / "config.yaml")
    zeroshot = ImageClassifier.from_clip(model, train.class_names)
    zeroshot.head.load_state_dict(zeroshot_head(model, train.class_names, config.recipe.resolved_templates()).state_dict())
    result = finetune(model, train, config, run_dir=output)
    if rank() != 0:
        return None
    points = wise_ft_sweep(zeroshot.eval(), result.classifier, test, shifted, config.wise_ft.sweep)
    chosen = wise_ft(zeroshot, result.classifier, config.wise_ft.alpha)
    chosen.image_size = config.data.image_size or chosen.image_size
    report = FinetuneReport(
        output, config.recipe.mode, config.wise_ft.alpha,
        zeroshot={"test": evaluate_classifier(zeroshot, test), "shifted": evaluate_classifier(zeroshot, shifted)},
        finetuned={"test": evaluate_classifier(chosen, test), "shifted": evaluate_classifier(chosen, shifted)},
        sweep=points, skipped_images=train.failures.count + test.failures.count, losses=result.losses,
    )  # fmt: skip
    if result.adapters is not None:
        from .lora import save_lora_adapter

        save_lora_adapter(
            output, result.adapters, config.model.lora, resolve_model(config.model.name), train.class_names,
            chosen.image_size, config.model.pretrained,
        )
    full = result.adapters is None or config.model.lora.merge  # LoRA: the adapters alone unless merged
    _save(report, chosen, _model_card(config, report, train_spec, test_spec), full=full)
    return report


def _model_card(config: FinetuneConfig, report: FinetuneReport, train_spec: str, test_spec: str) -> ModelCard:
    """The saved classifier's card: its data, recipe and its accuracy on the held-out split."""
    from vlm.defaults import resolve_model

    start = resolve_model(config.model.name)
    test, shifted = report.finetuned["test"], report.finetuned["shifted"]
    metrics = {"top1": test.top1, "top5": test.top5, "mean_per_class_recall": test.mean_per_class_recall}
    return card_for_run(
        data=train_spec,
        eval_data={CLASSIFICATION: test_spec},
        metrics={**metrics, "shifted_top1": shifted.top1},
        base_model=f"{start}:{config.model.pretrained}" if config.model.pretrained else start,
        name=Path(config.output_dir).name,
        mode=config.recipe.mode,
        epochs=config.recipe.epochs,
        batch_size=config.recipe.batch_size,
        lr=config.optim.lr,
        wise_ft=report.wise_ft,
        seed=config.seed,
    )


def _labelled(config: FinetuneConfig, spec: str, split: str, class_names: tuple[str, ...]) -> LabelledImages:
    from vlm.data import open_labelled

    data = config.data
    return open_labelled(
        spec, split=split, image_column=data.image_column, label_column=data.label_column, class_names=class_names or None
    )


def _load_data(config: FinetuneConfig, model_config, train_spec: str, test_spec: str) -> tuple[LoadedImages, ...]:
    """The decoded training and held-out images, and the held-out split's shifted copy."""
    from .augment import shift_images

    train = _decoded(config, model_config, "data.train", train_spec, config.data.split, config.data.class_names)
    # The held-out data takes the training classes' order (a table may lack a class, or list them otherwise).
    key = "data.eval" if config.data.eval is not None else "data.train"
    test = _decoded(config, model_config, key, test_spec, config.data.eval_split, train.class_names)
    if test.class_names != train.class_names:
        raise ValueError(
            f"the held-out data {test_spec} has classes {list(test.class_names)} and the training data {train_spec} "
            f"has {list(train.class_names)}; use data with the same classes"
        )
    shifted = replace(test, images=shift_images(test.images, seed=config.seed))
    return train, test, shifted


def _decoded(config: FinetuneConfig, model_config, key: str, spec: str, split: str, classes) -> LoadedImages:
    """The images of `spec` decoded; errors name the setting `key`, and more than data.max_skipped_fraction
    of them unreadable is one (`training.data_skips`)."""
    from .config_checks import setting_errors
    from .data_skips import check_skipped_share

    with setting_errors(key, spec):
        labelled = _labelled(config, spec, split, classes)
        images = load_images(
            labelled, model_config, image_size=config.data.image_size, progress=config.logging.progress
        )
        share = config.data.max_skipped_fraction
        check_skipped_share(images.failures.failures, len(labelled.images), share, f"{key}={spec}")
    return images


def _save(report: FinetuneReport, chosen: ImageClassifier, card: ModelCard, *, full: bool = True) -> None:
    from .plots import plot_wise_ft_sweep

    if full:
        chosen.save_pretrained(report.output_dir)
        write_model_card(report.output_dir, chosen, fmt="vlm", card=card)
    plot_wise_ft_sweep(report.sweep, report.output_dir / "sweep.png")
    atomic_write_text(report.output_dir / "metrics.json", json.dumps(report.to_dict(), indent=2))
    logger.info("classifier (WiSE-FT %g) saved to %s", report.wise_ft, report.output_dir)


@dataclass(frozen=True)
class ClassifierEvaluation:
    """A saved classifier measured on labelled images ("test") and on their shifted copy ("shifted")."""

    metrics: dict[str, Metrics]
    num_images: int  # images read
    failures: FailureLog  # unreadable images, left out


def evaluate_saved_classifier(
    model_dir: str,
    spec: str,
    *,
    split: str | None = "test",
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ClassifierEvaluation:
    """`vlm eval classify`: the classifier saved in `model_dir` on the labelled images `spec` names (integer
    labels index the classifier's classes, string labels are matched to them) and on their shifted copy."""
    from vlm.data import open_labelled

    from .augment import shift_images

    classifier = ImageClassifier.from_pretrained(model_dir)
    labelled = open_labelled(
        spec, split=split, image_column=image_column, label_column=label_column, class_names=classifier.class_names
    )
    data = load_images(labelled, classifier.clip_config, image_size=classifier.image_size, progress=progress)
    shifted = replace(data, images=shift_images(data.images, seed=seed))
    metrics = {"test": evaluate_classifier(classifier, data), "shifted": evaluate_classifier(classifier, shifted)}
    return ClassifierEvaluation(metrics, len(data), data.failures)
