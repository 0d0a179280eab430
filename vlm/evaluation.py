"""Evaluating a zero-shot classifier on labelled images, beside a supervised linear probe.

Data: `vlm.data.LabelledImages` (`vlm.data.open_labelled` reads class folders, tables and Hugging Face
datasets with the one label rule). Metrics: top-1, top-5, mean per-class recall,
per-class accuracy and the confusion matrix (rows: true class, columns: predicted), written as JSON and
PNG. The linear probe (`sklearn_linear_probe`: scikit-learn's logistic regression on the same frozen image
features; the fine-tuner's torch head is `training.finetune.fit_linear_head`) is trained on a separate
training split when one is given, else cross-validated on the evaluation data itself, so that both
numbers are measured on the same images.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .classify import classify_images
from .data import Failure, LabelledImages
from .files import atomic_write_text
from .metrics import confusion_matrix, per_class_recall, topk_accuracy
from .model import CLIP
from .zeroshot import ZeroShotClassifier

__all__ = [
    "Metrics",
    "ProbeResult",
    "ZeroShotEvaluation",
    "compute_metrics",
    "confusion_matrix",
    "cross_validated_probe",
    "evaluate_zeroshot",
    "linear_probe",
    "per_class_recall",
    "sklearn_linear_probe",
    "save_confusion_png",
]

logger = logging.getLogger(__name__)

# Inverse regularisation strengths the probe chooses from by cross-validation (features are standardised).
PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
PROBE_FOLDS = 5


# ---- metrics ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    """Classification metrics over `num_samples` images. `top5` uses k = min(5, number of classes); top-k
    counts ties against the image (`vlm.metrics.topk_accuracy`).

    `per_class_accuracy` (= recall) lists the classes that have images; `mean_per_class_recall` averages it.
    """

    top1: float
    top5: float
    mean_per_class_recall: float
    per_class_accuracy: dict[str, float]
    confusion: list[list[int]]
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return asdict(self)


def compute_metrics(scores: Tensor, targets: Tensor, class_names: Sequence[str]) -> Metrics:
    """Metrics of `scores` (N, C) (higher is better) against integer `targets` (N,)."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    if scores.ndim != 2 or scores.shape != (len(targets), len(class_names)):
        raise ValueError(
            f"scores must be (N, C) = ({len(targets)}, {len(class_names)}) for {len(targets)} targets and "
            f"{len(class_names)} classes, got {tuple(scores.shape)}"
        )
    confusion = confusion_matrix(scores.argmax(dim=1), targets, len(class_names))
    recall = per_class_recall(confusion)
    present = ~recall.isnan()
    accuracy = topk_accuracy(scores, targets, (1, 5))  # with fewer than 5 classes, top-5 is 1
    top1, top5 = accuracy[1], accuracy[5]
    return Metrics(
        top1=top1,
        top5=top5,
        mean_per_class_recall=float(recall[present].mean()) if present.any() else math.nan,
        per_class_accuracy={class_names[i]: float(recall[i]) for i in present.nonzero().flatten().tolist()},
        confusion=confusion.tolist(),
        num_samples=len(targets),
    )


def save_confusion_png(
    confusion: Sequence[Sequence[int]] | Tensor, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """The confusion matrix as a PNG heatmap, rows normalised (each true class sums to one), counts in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(torch.as_tensor(confusion), dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    size = min(4 + 0.45 * n, 40)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(n)
    ax.set_xticks(ticks, [str(c)[:20] for c in class_names], rotation=90 if n > 6 else 0)
    ax.set_yticks(ticks, [str(c)[:20] for c in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:  # beyond that, cell counts are unreadable
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(
                        j,
                        i,
                        int(counts[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---- linear probe -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    """Logistic regression on frozen image features: its metrics, the chosen C, and how it was trained."""

    metrics: Metrics
    C: float
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return {"protocol": self.protocol, "C": self.C, **self.metrics.to_dict()}


def _probe_model(C: float | None, folds: int = PROBE_FOLDS):
    """Standardised features into a logistic regression; with C=None, C is chosen by grid search."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0 if C is None else C, max_iter=2000))
    if C is not None:
        return pipeline
    return GridSearchCV(pipeline, {"logisticregression__C": list(PROBE_CS)}, cv=folds)


def _chosen_C(fitted) -> float:
    estimator = getattr(fitted, "best_estimator_", fitted)
    return float(estimator[-1].C)


def _full_scores(pipeline, features: np.ndarray, num_classes: int) -> Tensor:
    """(N, num_classes) probabilities; classes absent from the training labels score 0."""
    scores = np.zeros((len(features), num_classes))
    scores[:, pipeline.classes_] = pipeline.predict_proba(features)
    return torch.from_numpy(scores)


def sklearn_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    class_names: Sequence[str],
    *,
    C: float | None = None,
) -> ProbeResult:
    """Fits on the training features, scores the test features. `C=None` picks C among `PROBE_CS` by
    5-fold cross-validation on the training split."""
    folds = _folds(train_labels, "the probe's training split")
    with _single_threaded_blas():
        pipeline = _probe_model(C, folds).fit(train_features.numpy(), train_labels.numpy())
        scores = _full_scores(pipeline, test_features.numpy(), len(class_names))
    protocol = f"trained on a separate split of {len(train_labels)} images"
    return ProbeResult(compute_metrics(scores, test_labels, class_names), _chosen_C(pipeline), protocol)


# The name this function had before `training.finetune.fit_linear_head` (a torch head trained on the same
# kind of features) made "linear probe" ambiguous.
linear_probe = sklearn_linear_probe


def cross_validated_probe(
    features: Tensor, labels: Tensor, class_names: Sequence[str], *, C: float | None = None, folds: int = PROBE_FOLDS
) -> ProbeResult:
    """Every image scored by a probe trained on the other folds (stratified): a supervised baseline on
    exactly the images the zero-shot classifier was scored on, when no training split is given."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(folds, _folds(labels, "the evaluation data"))
    x, y = features.numpy(), labels.numpy()
    scores = torch.zeros(len(y), len(class_names), dtype=torch.float64)
    chosen = []
    with _single_threaded_blas():
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
            pipeline = _probe_model(C, _folds(labels[train], "a cross-validation fold")).fit(x[train], y[train])
            scores[test] = _full_scores(pipeline, x[test], len(class_names))
            chosen.append(_chosen_C(pipeline))
    protocol = f"{folds}-fold cross-validation on the evaluation images"
    return ProbeResult(compute_metrics(scores, labels, class_names), float(np.median(chosen)), protocol)


def _single_threaded_blas():
    """Once torch's OpenMP threads have run, numpy's multi-threaded OpenBLAS contends with them (spinning
    threads on the same cores) and the probe's small matrix products get 10-30x slower; one BLAS
    thread is faster for features of this size."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _folds(labels: Tensor, what: str) -> int:
    """How many stratified folds `labels` allow (at most PROBE_FOLDS), or ValueError if too few images."""
    counts = torch.bincount(labels)
    if int((counts > 0).sum()) < 2 or int(counts.max()) < 2:
        raise ValueError(
            f"a linear probe needs at least two classes and two images of one class in {what}, got "
            f"{len(labels)} images; pass --no-probe to skip it"
        )
    return min(PROBE_FOLDS, int(counts.max()))


# ---- the whole evaluation -----------------------------------------------------------------------
@dataclass
class ZeroShotEvaluation:
    """Zero-shot metrics, the linear-probe baseline on the same images, and the images skipped."""

    class_names: tuple[str, ...]
    zeroshot: Metrics
    linear_probe: ProbeResult | None
    failures: list[Failure]
    model_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return {
            "class_names": list(self.class_names),
            "model_fingerprint": self.model_fingerprint,
            "zeroshot": self.zeroshot.to_dict(),
            "linear_probe": None if self.linear_probe is None else self.linear_probe.to_dict(),
            "skipped": [{"image": f.source, "reason": f.reason} for f in self.failures],
        }

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """`results.json`, `confusion_zeroshot.png` and (with a probe) `confusion_linear_probe.png`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        results = directory / "results.json"
        atomic_write_text(results, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        written = [
            results,
            save_confusion_png(
                self.zeroshot.confusion, self.class_names, directory / "confusion_zeroshot.png", "zero-shot"
            ),
        ]
        if self.linear_probe is not None:
            written.append(
                save_confusion_png(
                    self.linear_probe.metrics.confusion,
                    self.class_names,
                    directory / "confusion_linear_probe.png",
                    "linear probe",
                )
            )
        return written

    def summary(self) -> str:
        """A side-by-side table of the zero-shot and linear-probe numbers."""
        rows = [("zero-shot", self.zeroshot)]
        if self.linear_probe is not None:
            rows.append(("linear probe", self.linear_probe.metrics))
        lines = [f"{'':<14}{'top-1':>8}{'top-5':>8}{'mean per-class recall':>24}{'images':>8}"]
        lines += [
            f"{name:<14}{m.top1:>8.4f}{m.top5:>8.4f}{m.mean_per_class_recall:>24.4f}{m.num_samples:>8}"
            for name, m in rows
        ]
        if self.linear_probe is not None:
            lines.append(f"linear probe: {self.linear_probe.protocol}, C={self.linear_probe.C:g}")
        if self.failures:
            lines.append(f"{len(self.failures)} unreadable images skipped")
        return "\n".join(lines)


def _targets_in_classifier(data: LabelledImages, classifier: ZeroShotClassifier) -> Tensor:
    """The data's labels as indices into the classifier's classes, matched by name."""
    index = {name: i for i, name in enumerate(classifier.class_names)}
    missing = [name for name in data.class_names if name not in index]
    if missing:
        raise ValueError(
            f"the classifier has no class for {missing[:5]} (data classes must be among the classifier's, "
            f"matched by name; it has {list(classifier.class_names)[:10]}...); add them to the labels file"
        )
    mapping = torch.tensor([index[name] for name in data.class_names], dtype=torch.long)
    return mapping[torch.tensor(data.labels, dtype=torch.long)]


def evaluate_zeroshot(
    model: CLIP,
    classifier: ZeroShotClassifier,
    data: LabelledImages,
    *,
    probe: bool = True,
    probe_train: LabelledImages | None = None,
    probe_C: float | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    check_model: bool = True,
) -> ZeroShotEvaluation:
    """Zero-shot metrics of `classifier` on `data` and, with `probe`, the linear-probe baseline on the same
    features (trained on `probe_train` if given, else cross-validated on `data`). `check_model`: as in
    `vlm.classify.classify_images`."""
    if check_model:
        classifier.check_model(model)
    targets = _targets_in_classifier(data, classifier)
    train = probe_train if probe else None
    train_targets = _targets_in_classifier(train, classifier) if train is not None else None
    run = dict(batch_size=batch_size, num_workers=num_workers, progress=progress, check_model=False)
    result = classify_images(model, classifier, data.images, **run)
    if not len(result.indices):
        raise ValueError(f"none of the {len(data.images)} images could be read; see the warnings above for why")
    targets = targets[result.indices]
    names = classifier.class_names
    zeroshot = compute_metrics(result.probabilities(), targets, names)
    failures = list(result.failures)
    baseline = None
    if train is not None:
        fit = classify_images(model, classifier, train.images, **run)
        failures += fit.failures
        baseline = sklearn_linear_probe(
            fit.embeddings, train_targets[fit.indices], result.embeddings, targets, names, C=probe_C
        )
    elif probe:
        baseline = cross_validated_probe(result.embeddings, targets, names, C=probe_C)
    return ZeroShotEvaluation(names, zeroshot, baseline, failures, classifier.model_fingerprint)
