"""Real data that ships inside packages, written out the way users keep their own data.

scikit-learn's handwritten digits (1,797 real 8x8 scans) become PNG files in class subfolders and
CSV tables of image paths and captions, with a fixed, stratified 20% held-out split.

The demo, the tests and the benchmarks share it. It imports numpy alone at load (scikit-learn, Pillow and vlm's digit
renderer when called) and nothing of training or retrieval, so the core's tests can use it.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DIGIT_NAMES",
    "TRAIN_TEMPLATES",
    "EVAL_TEMPLATES",
    "DigitsSplit",
    "DigitsData",
    "write_digits",
    "digit_caption",
]

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Training captions. The zero-shot prompts below share none of these sentences, so held-out accuracy
# measures transfer to new wordings, not recall of the training captions.
TRAIN_TEMPLATES = (
    "a handwritten {digit}",
    "a handwritten {name}",
    "the digit {digit}",
    "the number {name}",
    "a scan of the digit {name}",
    "{name}, written by hand",
)
EVAL_TEMPLATES = (
    "a photo of the number {digit}.",
    "an image of a handwritten {name}.",
    "a drawing of the digit {digit}.",
)


def digit_caption(label: int, template: str) -> str:
    """`template` filled with the digit (``{digit}``: "7") and its name (``{name}``: "seven")."""
    return template.format(digit=label, name=DIGIT_NAMES[label])


@dataclass(frozen=True)
class DigitsSplit:
    """One split: image paths, integer labels and one caption per image."""

    paths: list[Path]
    labels: list[int]
    captions: list[str]
    table: Path  # CSV with columns image, caption, label


@dataclass(frozen=True)
class DigitsData:
    """The written digits: both splits under `root` (class folders and CSV tables) and the class names."""
    root: Path
    train: DigitsSplit
    test: DigitsSplit
    class_names: tuple[str, ...] = DIGIT_NAMES


def write_digits(root: str | Path, *, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DigitsData:
    """Writes the digits under `root` (idempotent) and returns both splits.

    Layout: ``root/{train,test}/<name>/<index>.png`` (class = subfolder) and ``root/{train,test}.csv``.
    Each training image gets a caption from `TRAIN_TEMPLATES`, chosen by its index.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from vlm.data.digits import render_digit

    root = Path(root)
    digits = load_digits()
    order = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        order, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    splits = {}
    for split, indices in (("train", sorted(train_idx)), ("test", sorted(test_idx))):
        paths, labels, captions = [], [], []
        for i in indices:
            label = int(digits.target[i])
            path = root / split / DIGIT_NAMES[label] / f"{i:04d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(render_digit(digits.images[i], image_size)).save(path)
            paths.append(path)
            labels.append(label)
            captions.append(digit_caption(label, TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)]))
        table = root / f"{split}.csv"
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption", "label"])
            writer.writerows((str(p.relative_to(root)), c, DIGIT_NAMES[y]) for p, c, y in zip(paths, captions, labels))
        splits[split] = DigitsSplit(paths, labels, captions, table)
    logger.info("digits written to %s: %d train, %d test", root, len(train_idx), len(test_idx))
    return DigitsData(root, splits["train"], splits["test"])
