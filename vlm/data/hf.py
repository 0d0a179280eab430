"""Hugging Face datasets as sources: one way to name them, load them and read their images.

A command names a dataset ``hf:NAME_OR_DIR``: a directory written by `save_to_disk` (a Dataset, or a
DatasetDict and a split), or anything `datasets.load_dataset` takes (an ``imagefolder`` directory, a
hub name when online). A directory written by `save_to_disk` is also recognised without the prefix.

Images are never decoded by `datasets`: image columns are cast to ``Image(decode=False)`` and read
as encoded bytes (or the file's path), which `vlm.load_image` decodes in DataLoader workers, so a
corrupt image is a reported, skipped sample instead of an exception inside the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .columns import pick_column

__all__ = [
    "HF_PREFIX",
    "HFImageColumn",
    "is_hf_dataset",
    "is_hf_spec",
    "is_saved_hf_dataset",
    "load_hf_dataset",
    "column_values",
    "image_columns",
    "keep_encoded",
    "undecoded",
]

HF_PREFIX = "hf:"
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes


def is_saved_hf_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return any((Path(path) / marker).is_file() for marker in _SAVED_MARKERS)


def is_hf_spec(spec: Any) -> bool:
    """Whether `spec` names a Hugging Face dataset: ``hf:NAME_OR_DIR``, or a `save_to_disk` directory."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    text = os.fspath(spec)
    return text.startswith(HF_PREFIX) or (Path(text).is_dir() and is_saved_hf_dataset(text))


def is_hf_dataset(value: Any) -> bool:
    """Whether `value` is a `datasets.Dataset` or `DatasetDict` object (without importing `datasets`)."""
    module = type(value).__module__ or ""
    return module.startswith("datasets") and type(value).__name__ in ("Dataset", "DatasetDict")


def load_hf_dataset(spec: Any, split: str | None = None, *, builder: str | None = None) -> Any:
    """The `datasets.Dataset` that `spec` names (see the module docstring), or `spec` itself when it is a
    Dataset or DatasetDict object. A DatasetDict needs `split` unless it has one split; `builder`
    (e.g. "imagefolder") loads the directory `spec` with that builder."""
    import datasets

    if is_hf_dataset(spec):
        return _one_split(spec, split, "the dataset")
    name = os.fspath(spec).removeprefix(HF_PREFIX)
    try:
        if builder is not None:
            data = datasets.load_dataset(builder, data_dir=name, split=split)
        elif is_saved_hf_dataset(name):
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise ValueError(f"cannot load the Hugging Face dataset {name!r} (split {split!r}): {err}") from err
    data = _one_split(data, split, name)
    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"{name} loaded as {type(data).__name__}; give a map-style datasets.Dataset")
    return data


def _one_split(data: Any, split: str | None, name: str) -> Any:
    import datasets

    if not isinstance(data, datasets.DatasetDict):
        return data
    if split is None:
        if len(data) != 1:
            raise ValueError(f"{name} has splits {list(data)}; choose one with --split (data.split in a training config)")
        split = next(iter(data))
    if split not in data:
        raise ValueError(
            f"{name} has no split {split!r}; its splits are {list(data)}; choose one with --split "
            "(data.split or data.eval_split in a training config)"
        )
    return data[split]


def image_columns(dataset: Any) -> list[str]:
    """The columns with an `Image` feature, the image column's first candidates."""
    import datasets

    return [name for name, feature in (dataset.features or {}).items() if isinstance(feature, datasets.Image)]


def keep_encoded(dataset: Any, column: str) -> Any:
    """`dataset` with the image column `column` left encoded (``Image(decode=False)``): the one place
    where images leave `datasets` undecoded, for our workers to decode and skip when broken."""
    import datasets

    if isinstance((dataset.features or {}).get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def undecoded(value: Any) -> Any:
    """An image cell as `vlm.load_image` reads it: ``{"bytes", "path"}`` as its bytes, else its path."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") is not None else value.get("path")
    return value


class HFImageColumn(Sequence):
    """The image column of a `datasets.Dataset` as a sequence of encoded images (bytes or paths), read
    on demand from the memory-mapped dataset (picklable, so it travels to DataLoader workers)."""

    def __init__(self, dataset: Any, column: str | None = None) -> None:
        column = pick_column(dataset.column_names, "image", column, where="the dataset", prefer=image_columns(dataset))
        self.dataset = keep_encoded(dataset, column).select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return undecoded(self.dataset[int(index)][self.column])

    def files(self) -> list[str | None]:
        """Each row's image file when it has one on disk (else None), read without the image bytes."""
        import pyarrow.compute as pc

        if not _is_image(self.dataset, self.column):  # a column of file names
            return [str(v) for v in self.dataset[self.column]]
        files: list[str | None] = []
        for batch in self.dataset.with_format("arrow").iter(batch_size=1000):
            paths = pc.struct_field(batch.column(self.column), "path").to_pylist()
            files += [p if p and os.path.isfile(p) else None for p in paths]
        return files


def _is_image(dataset: Any, column: str) -> bool:
    import datasets

    return isinstance(dataset.features[column], datasets.Image)


def column_values(dataset: Any, column: str) -> list[Any]:
    """The values of a dataset column, class labels as their names (None where a row has no label)."""
    import datasets

    feature, values = dataset.features[column], dataset[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    return list(values)
