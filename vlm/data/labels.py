"""Labelled images: a folder of class folders, a table with a label column, or a Hugging Face dataset,
and the one rule that turns a label column into class ids.

The label rule (`label_ids`), the same for every verb and for training's zero-shot set:

- Labels are read as text (a Parquet or JSON 3.0 is the label 3; a `ClassLabel` id is its name). An
  empty label is an error naming its row.
- With class names (``--class-names``, ``--labels``, ``eval.classnames``, a `ClassLabel`'s names): labels
  that are all class names are those classes; else labels that are all integers number the classes
  (0, 1, ...). A column may also mix the two: each label that is a class name is that class, each other
  integer numbers a class. The one refused mix is an integer that is also a class name next to labels
  that are not names (``"1"`` could be the class named "1" or class number 1): write every label one way.
- Without class names: labels that are all integers are the classes "0".."max"; others are class
  names, sorted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .batches import find_images
from .collection import ImageCollection, hf_collection, only_for_training, source_kind, table_collection
from .columns import pick_column
from .hf import column_values, load_hf_dataset
from .tables import read_table

__all__ = [
    "LabelledImages",
    "label_ids",
    "labelled_folder",
    "labelled_hf_dataset",
    "labelled_table",
    "open_labelled",
]

_INTEGER = re.compile(r"-?[0-9]+")
_FIX_NAMES = "--class-names (eval.classnames in a training config)"


@dataclass(frozen=True)
class LabelledImages:
    """Images with integer labels into `class_names`."""

    images: ImageCollection
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        assert len(self.labels) == len(self.images), "one label per image"


def label_ids(
    values: Sequence[Any], class_names: Sequence[str] | None = None, *, where: str, column: str = "label"
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The class id of each label in `values` and the class names, by the rule in the module docstring.
    `where` (a file, a dataset) and `column` name the data in errors."""
    texts = _label_texts(values, where, column)
    if class_names is None:
        if texts and all(_INTEGER.fullmatch(t) for t in texts):
            ids = tuple(int(t) for t in texts)
            _check_numbers(ids, None, where)
            return ids, tuple(str(i) for i in range(max(ids) + 1))
        names = tuple(sorted(set(texts)))
        index = {name: i for i, name in enumerate(names)}
        return tuple(index[t] for t in texts), names
    names = tuple(str(name) for name in class_names)
    if len(set(names)) != len(names):
        raise ValueError(f"the class names {list(names)} repeat a name; give each class once")
    return _ids_with_names(texts, names, where, column), names


def _label_texts(values: Sequence[Any], where: str, column: str) -> list[str]:
    texts = []
    for row, value in enumerate(values, start=1):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # Parquet and JSON may hold 3 as 3.0
        text = "" if value is None else str(value).strip()
        if not text:
            raise ValueError(f"{where}: row {row} has an empty {column!r}; give every image a label, or drop the row")
        texts.append(text)
    return texts


def _ids_with_names(texts: list[str], names: tuple[str, ...], where: str, column: str) -> tuple[int, ...]:
    index = {name: i for i, name in enumerate(names)}
    if all(t in index for t in texts):
        return tuple(index[t] for t in texts)
    numbers = {t for t in texts if _INTEGER.fullmatch(t)}
    if len(numbers) < len(set(texts)):  # some labels are names: a mixed column
        unknown = sorted({t for t in texts if t not in index and t not in numbers})
        if unknown:
            raise ValueError(f"{where}: labels {unknown[:5]} are not among the class names {list(names)}; fix {_FIX_NAMES}")
        ambiguous = sorted(numbers & set(index))
        if ambiguous:
            raise ValueError(
                f"{where}: the {column!r} column mixes class names and class numbers, and {ambiguous[:3]} could be "
                "either; write every label as a class name, or every label as a number"
            )
    ids = tuple(index[t] if t in index and t not in numbers else int(t) for t in texts)
    _check_numbers(tuple(int(t) for t in numbers), names, where)
    return ids


def _check_numbers(numbers: tuple[int, ...], names: tuple[str, ...] | None, where: str) -> None:
    if not numbers:
        return
    if min(numbers) < 0:
        raise ValueError(f"{where}: label {min(numbers)} is negative; integer labels number the classes 0, 1, ...")
    if names is not None and max(numbers) >= len(names):
        raise ValueError(
            f"{where}: label {max(numbers)} is outside the {len(names)} class names; give one name per label "
            f"0..max with {_FIX_NAMES}"
        )


def labelled_folder(root: str | os.PathLike, *, class_names: Sequence[str] | None = None) -> LabelledImages:
    """Images under `root/<class>/...` (any depth below the class folder). Classes are sorted by name,
    or, with `class_names`, in that order (every name must have a folder, and every folder a name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give a folder with one subfolder of images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is not None:
        found = {p.name: p for p in class_dirs}
        if set(found) != set(class_names) or len(set(class_names)) != len(class_names):
            raise ValueError(
                f"{root} has class folders {sorted(found)}, but the classes are {list(class_names)}; "
                "give a folder with one subfolder per class name, each name once"
            )
        class_dirs = [found[name] for name in class_names]
    paths, labels = [], []
    for label, folder in enumerate(class_dirs):
        found_images = find_images(folder)
        paths += [str(p) for p in found_images]
        labels += [label] * len(found_images)
    if not paths:
        raise ValueError(f"{root} has no class subfolders with images; lay it out as {root}/<class name>/<image>")
    keys = [str(Path(p).resolve()) for p in paths]
    images = ImageCollection(paths, paths, keys, description=f"class folders {root} ({len(paths)} images)")
    return LabelledImages(images, tuple(labels), tuple(p.name for p in class_dirs))


def labelled_hf_dataset(
    dataset: Any,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    prefix: str = "dataset",
) -> LabelledImages:
    """A `datasets.Dataset` with an image and a label column; a `ClassLabel` column's names are the
    classes unless `class_names` orders them."""
    import datasets

    column = pick_column(dataset.column_names, "label", label_column, where="the dataset")
    feature = dataset.features[column]
    if class_names is None and isinstance(feature, datasets.ClassLabel):
        class_names = feature.names
    labels, names = label_ids(column_values(dataset, column), class_names, where="the dataset", column=column)
    return LabelledImages(hf_collection(dataset, image_column, prefix=prefix), labels, names)


def labelled_table(
    path: str | os.PathLike,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    image_root: str | None = None,
) -> LabelledImages:
    """A table (CSV, TSV, JSON Lines, JSON, Parquet) with an image-path column and a label column.
    Relative image paths are taken from the table's folder (or `image_root`)."""
    table = read_table(path)
    if not len(table):
        raise ValueError(f"the table {path} has no rows; give one row per image")
    column = pick_column(table.column_names, "label", label_column, where=f"table {path}")
    images = table_collection(table, image_column, base=image_root)
    labels, names = label_ids(list(table.column(column)), class_names, where=str(path), column=column)
    return LabelledImages(images, labels, names)


def open_labelled(
    spec: Any,
    *,
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    image_root: str | None = None,
) -> LabelledImages:
    """Labelled images named the way every verb takes them: ``hf:NAME_OR_DIR`` (or a `save_to_disk`
    directory, or a `datasets` object) for a Hugging Face dataset (its `split`), a table file, or a
    folder of class folders. `class_names` orders the classes (see the module docstring)."""
    kind = source_kind(spec)
    if kind == "tar":
        raise only_for_training(spec)
    if kind == "hf":
        dataset = load_hf_dataset(spec, split)
        columns = dict(image_column=image_column, label_column=label_column, class_names=class_names)
        return labelled_hf_dataset(dataset, **columns, prefix=split or "dataset")
    if kind == "table":
        columns = dict(image_column=image_column, label_column=label_column, image_root=image_root)
        return labelled_table(spec, **columns, class_names=class_names)
    if kind == "folder":
        return labelled_folder(spec, class_names=class_names)
    raise ValueError(
        f"{spec} holds no labels; give a folder with one subfolder of images per class, a table with image and "
        "label columns, or hf:NAME_OR_DIR"
    )
