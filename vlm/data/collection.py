"""One image-collection type for every verb that reads images: files, folders, list files, tables and
Hugging Face datasets, with their texts when the source has a text column.

`source_kind` tells the kinds apart the same way for every verb; `open_images` opens any of them and
`image_files` several files and folders at once. Every item has a `key`, its identity: the image's
absolute path with links resolved (or ``hf:<fingerprint>/<row>`` for dataset images without a file of
their own, ``<table>#<row>`` for images held in a table cell).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .batches import find_images
from .columns import pick_column
from .hf import HFImageColumn, column_values, is_hf_dataset, is_hf_spec, load_hf_dataset
from .tables import LIST_SUFFIXES, TABLE_SUFFIXES, Table, image_cell, is_table, read_list, read_table, written_image_path

__all__ = [
    "ImageCollection",
    "Subset",
    "source_kind",
    "is_tar_spec",
    "only_for_training",
    "open_images",
    "image_files",
    "is_inside_folder",
]

logger = logging.getLogger(__name__)

SOURCE_HELP = (
    f"give a folder of images, image files, a table ({', '.join(TABLE_SUFFIXES)}), a list file "
    f"({', '.join(LIST_SUFFIXES)}) or hf:NAME_OR_DIR for a Hugging Face dataset"
)


@dataclass
class ImageCollection:
    """Images and what the source says about them, one entry per item.

    `sources[i]` is what `vlm.load_image` reads (a path or encoded bytes, loaded lazily), `names[i]` how
    messages name it, `keys[i]` its identity and `paths[i]` where it came from (the key for bytes).
    `captions` holds the text column (None where a row has none), or is None without a text column;
    `extra` holds the source's other columns; `folders` the folders its files were listed from, as
    written (the folder itself, or the folders a table's rows name, each once).
    """

    sources: Sequence[Any]
    names: Sequence[str]
    keys: list[str] = None  # type: ignore[assignment]  # default: the names
    paths: list[str] = None  # type: ignore[assignment]  # default: the keys
    captions: list[str | None] | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)
    description: str = ""
    folders: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = list(self.names) if self.keys is None else self.keys
        self.paths = list(self.keys) if self.paths is None else self.paths
        assert len(self.sources) == len(self.names) == len(self.keys) == len(self.paths), "one entry per item"

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, positions: Sequence[int]) -> "ImageCollection":
        """The items at `positions`, in that order (images stay lazily loaded; other fields are kept)."""
        positions = list(positions)
        pick = lambda values: [values[i] for i in positions]  # noqa: E731
        return dataclasses.replace(
            self,
            sources=Subset(self.sources, positions),
            names=pick(self.names),
            keys=pick(self.keys),
            paths=pick(self.paths),
            captions=pick(self.captions) if self.captions is not None else None,
            extra={name: pick(values) for name, values in self.extra.items()},
            description=f"{len(positions)} of {self.description}",
        )


class Subset(Sequence):
    """`base[positions[i]]`: a lazy view of some items of a sequence (picklable, for DataLoader workers)."""

    def __init__(self, base: Sequence[Any], positions: list[int]) -> None:
        if isinstance(base, Subset):  # a view of a view reads the original directly
            base, positions = base.base, [base.positions[i] for i in positions]
        self.base, self.positions = base, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.base[self.positions[i]]


def is_tar_spec(spec: Any) -> bool:
    """Whether `spec` names webdataset tar shards (a ``.tar`` file, a brace range or a glob of them)."""
    return isinstance(spec, (str, os.PathLike)) and ".tar" in os.fspath(spec) and not is_hf_spec(spec)


def only_for_training(spec: Any) -> ValueError:
    """The error of a verb other than `vlm train` given tar shards."""
    return ValueError(f"{spec} names webdataset tar shards, which only `vlm train` reads (streamed); {SOURCE_HELP}")


def source_kind(source: Any) -> str:
    """What `source` is: "hf" (``hf:...``, a `save_to_disk` directory or a `datasets` object), "tar"
    (webdataset shards), "folder", "table", "list" (by suffix) or "image" (any other existing file).
    FileNotFoundError otherwise."""
    if is_hf_dataset(source) or is_hf_spec(source):
        return "hf"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"cannot read images from a {type(source).__name__}: {SOURCE_HELP}")
    if is_tar_spec(source):
        return "tar"
    path = Path(source)
    if path.is_dir():
        return "folder"
    if is_table(path):
        return "table"
    if path.suffix.lower() in LIST_SUFFIXES:
        return "list"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {SOURCE_HELP}")
    return "image"


def open_images(
    source: Any, *, split: str | None = None, image_column: str | None = None, text_column: str | None = None
) -> ImageCollection:
    """The collection `source` names: one folder (recursive), image file, list file, table or Hugging
    Face dataset (its `split`), or a list or tuple of several image files, folders and list files."""
    if isinstance(source, (list, tuple)):
        if len(source) != 1:
            return image_files(source)
        source = source[0]
    kind = source_kind(source)
    if kind == "tar":
        raise only_for_training(source)
    if kind == "hf":
        dataset = load_hf_dataset(source, split)
        return hf_collection(dataset, image_column, text_column, prefix=split or "dataset")
    if kind in ("table", "list"):
        table = read_table(source) if kind == "table" else read_list(source)
        return table_collection(table, image_column, text_column)
    return _folder_collection(Path(source))


def image_files(inputs: Sequence[str | os.PathLike]) -> ImageCollection:
    """Image files named directly, found (recursively) in folders, or listed in list files, in the order
    given. A file named directly is kept whatever its extension (if it cannot be read, it is reported
    as a failure like any broken image); folders contribute the files with image extensions."""
    parts = []
    for item in inputs:
        kind = source_kind(item)
        if kind == "tar":
            raise only_for_training(item)
        if kind in ("hf", "table"):
            raise ValueError(f"give {item} alone: a table or a Hugging Face dataset is not mixed with other images")
        parts.append(table_collection(read_list(item)) if kind == "list" else _folder_collection(Path(item)))
    if not any(len(part) for part in parts):
        raise ValueError(f"no image files found in {', '.join(map(str, inputs))}; {SOURCE_HELP}")
    joined = lambda name: [value for part in parts for value in getattr(part, name)]  # noqa: E731
    folders = _outermost([folder for part in parts for folder in part.folders])
    description = f"{len(joined('keys'))} images from {len(inputs)} inputs"
    return ImageCollection(joined("sources"), joined("names"), joined("keys"), folders=folders, description=description)


def _folder_collection(root: Path) -> ImageCollection:
    """The images below `root` (or `root` itself, a file), named as found; the extra column ``folder``
    holds each image's folder relative to the root ("" at the root)."""
    files = find_images(root)
    if root.is_dir() and not files:
        logger.warning("no image files under %s", root)
    base = root if root.is_dir() else root.parent
    paths = [str(p.resolve()) for p in files]
    folders = [p.parent.relative_to(base).as_posix() if p.parent != base else "" for p in files]
    description = f"folder {root} ({len(paths)} images)"
    extra = {"folder": folders}
    return ImageCollection(paths, [str(p) for p in files], paths, extra=extra, description=description, folders=[str(base)])


def table_collection(
    table: Table, image_column: str | None = None, text_column: str | None = None, *, base: str | None = None
) -> ImageCollection:
    """The images a table's rows name (relative to the table's folder, or `base`), with its text column
    when it has one; the other columns go to `extra`."""
    where = f"table {table.path}"
    image_col = pick_column(table.column_names, "image", image_column, where=where)
    text_col = pick_column(table.column_names, "text", text_column, where=where, required=False)
    base = base or str(table.path.parent)
    cells = list(table.column(image_col))
    sources = [image_cell(value, base) for value in cells]
    keys = [s if isinstance(s, str) else f"{table.path.resolve()}#{i}" for i, s in enumerate(sources)]
    written = [written_image_path(value, base) for value in cells if isinstance(value, str)]
    captions = None
    if text_col is not None:
        captions = [None if value in (None, "") else str(value) for value in table.column(text_col)]
    extra = {c: list(table.column(c)) for c in table.column_names if c not in (image_col, text_col)}
    description = f"table {table.path} ({len(keys)} rows)"
    return ImageCollection(sources, keys, keys, captions=captions, extra=extra, description=description,
                           folders=_outermost(os.path.dirname(p) for p in written))  # fmt: skip


def hf_collection(
    dataset: Any, image_column: str | None = None, text_column: str | None = None, *, prefix: str = "dataset"
) -> ImageCollection:
    """The images of a `datasets.Dataset`, named ``prefix[row]``. Rows whose image is a file on disk are
    read from it (and keyed by its path); when some row has none, every row is read from the dataset's
    encoded bytes (`HFImageColumn`)."""
    column = HFImageColumn(dataset, image_column)
    text_col = pick_column(dataset.column_names, "text", text_column, where="the dataset", required=False)
    files = column.files()
    counts = Counter(files)
    # The same file listed twice is one item; rows without a file (bytes only) are each their own item.
    keys = [f if f is not None and counts[f] == 1 else f"hf:{dataset._fingerprint}/{i}" for i, f in enumerate(files)]
    on_disk = all(f is not None for f in files)
    captions = None
    if text_col is not None:
        captions = [None if value in (None, "") else str(value) for value in dataset[text_col]]
    extra = {c: column_values(dataset, c) for c in dataset.column_names if c not in (column.column, text_col)}
    name = getattr(dataset, "info", None) and dataset.info.dataset_name or dataset._fingerprint
    return ImageCollection(
        files if on_disk else column,
        [f"{prefix}[{i}]" for i in range(len(files))],
        keys,
        files if on_disk else keys,
        captions=captions,
        extra=extra,
        description=f"dataset {name} ({len(files)} rows)",
        folders=_outermost(os.path.dirname(os.path.abspath(f)) for f in files) if on_disk else [],
    )


def is_inside_folder(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it, comparing the strings as given (nothing resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _outermost(folders: Any) -> list[str]:
    """The distinct `folders` without those inside another, sorted."""
    kept: list[str] = []
    for folder in sorted(set(folders), key=lambda f: f.split(os.sep)):
        if not kept or not is_inside_folder(folder, kept[-1]):
            kept.append(folder)
    return kept
