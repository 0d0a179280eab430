"""Collections to index: a folder (recursive), a list file, a table of image paths and captions, or a
Hugging Face dataset, all turned into one `Collection`.

- Folder: every image below it (`vlm.data.find_images`); the extra column ``folder`` holds each image's
  folder relative to the root ("" at the root), so a search can be restricted to one folder.
- List file (``.txt``, ``.lst``, ``.list``): one image path per line, optionally ``path<TAB>caption``;
  blank lines and lines starting with ``#`` are skipped.
- Table (``.csv``, ``.tsv``, ``.jsonl``, ``.json``, ``.parquet``): an image column and an optional caption
  column (found by name, or named with `image_column` / `caption_column`); every other column becomes
  metadata (``label``, ``split``...).
- Hugging Face dataset: a `datasets.Dataset` (from `load_dataset("imagefolder", data_dir=...)`, say), a
  `DatasetDict` with `split`, or a directory written by `save_to_disk`. Image columns are read as
  encoded bytes (decoded in the loader workers, with reduced-size JPEG decoding); class labels become
  their names.

Relative paths in list files and tables are relative to the file's own directory. Every item has a
`key`, its identity across updates: the image's absolute path (or ``hf:<fingerprint>/<row>`` for
dataset images without one); in a caption collection (``modality="text"``) the key is path + caption.

**Roots.** A collection lists only files inside its roots: the folders the user gives (`roots=`, `--root`),
by default the folder itself, or, for a list file, a table or a dataset of files, the folders its rows
name (each once, without those inside another). A file whose real path (links resolved) lies outside
them, such as a link in the folder that points elsewhere, is left out and reported in
`Collection.outside`; the index records the roots, and the service serves files from them and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vlm.data import IMAGE_EXTENSIONS, find_images
from vlm.tables import TABLE_SUFFIXES, read_table, resolve_image_path, written_image_path

__all__ = ["Collection", "Subset", "open_source", "MODALITIES", "TABLE_SUFFIXES", "LIST_SUFFIXES"]

logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")
LIST_SUFFIXES = (".txt", ".lst", ".list")
IMAGE_COLUMNS = ("image", "image_path", "img_path", "filepath", "file_path", "path", "file", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "description", "alt", "sentence")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]")


@dataclass
class Collection:
    """Items to embed. `images[i]` is what `vlm.load_image` reads (a path or encoded bytes, loaded lazily);
    `keys[i]` is the item's unique identity and `paths[i]` where it came from."""

    keys: list[str]
    paths: list[str]
    images: Sequence[Any]
    captions: list[str | None] | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)
    modality: str = "image"
    description: str = ""
    roots: list[str] = field(default_factory=list)  # real paths of the folders the files must lie in
    outside: list[str] = field(default_factory=list)  # files left out: their real path is outside the roots

    def __len__(self) -> int:
        return len(self.keys)

    def digest(self) -> str:
        """A hash of the keys in order: identifies this exact list of items (for resuming jobs)."""
        h = hashlib.sha256(self.modality.encode())
        for key in self.keys:
            h.update(key.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()[:16]

    def texts(self) -> list[str]:
        """The captions, None as ""; ValueError when the collection has none."""
        if self.captions is None:
            raise ValueError(f"{self.description} has no captions; give a table with a caption column")
        return [c or "" for c in self.captions]

    def row(self, position: int) -> dict[str, Any]:
        """The metadata of item `position` (without its id)."""
        row = {"key": self.keys[position], "path": self.paths[position]}
        row["caption"] = self.captions[position] if self.captions is not None else None
        row.update({name: values[position] for name, values in self.extra.items()})
        return row

    def first_of_each_image(self) -> list[int]:
        """Positions of the first item of each distinct image (a caption collection lists an image once
        per caption)."""
        first: dict[str, int] = {}
        for i, path in enumerate(self.paths):
            first.setdefault(path, i)
        return list(first.values())

    def subset(self, positions: Sequence[int]) -> "Collection":
        """A new collection of the items at `positions`, in that order (images stay lazily loaded)."""
        pick = lambda values: [values[i] for i in positions]  # noqa: E731
        return Collection(
            keys=pick(self.keys),
            paths=pick(self.paths),
            images=Subset(self.images, list(positions)),
            captions=pick(self.captions) if self.captions is not None else None,
            extra={name: pick(values) for name, values in self.extra.items()},
            modality=self.modality,
            description=f"{len(positions)} of {self.description}",
            roots=self.roots,
        )


class Subset(Sequence):
    """`base[positions[i]]`: a lazy view of some items of a sequence (picklable, for DataLoader workers)."""

    def __init__(self, base: Sequence[Any], positions: list[int]) -> None:
        self.base, self.positions = base, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.positions[i]]


def open_source(
    source: Any,
    *,
    modality: str = "image",
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str | None = None,
    roots: Sequence[str | os.PathLike] | None = None,
) -> Collection:
    """The `Collection` of `source`: a folder, list file, table, HF dataset directory or `datasets` object,
    without the files outside `roots` (default: the source's own folder; see the module docstring)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    rows = _open_rows(source, image_column, caption_column, split)
    return keep_inside(_finish(rows, modality), rows.roots if roots is None else roots)


def keep_inside(collection: Collection, roots: Sequence[str | os.PathLike]) -> Collection:
    """`collection` without the items whose file's real path lies outside `roots` (listed in `.outside`
    and logged); items read from bytes (dataset rows without a file) are kept."""
    real_roots = [os.path.realpath(r) for r in roots]
    for root in real_roots:
        if not os.path.isdir(root):
            raise ValueError(f"root {root} is not a folder; give the folders the indexed files live in")
    files = _from_files(collection)
    outside = sorted({p for p, file in zip(collection.paths, files) if file and not is_inside(p, real_roots)})
    if outside:
        logger.warning(
            "%s: %d file(s) resolve outside %s and are not indexed, e.g. %s; pass --root for each folder "
            "that may be indexed and served",
            collection.description, len(outside), ", ".join(real_roots) or "any root", outside[0],
        )
        skip = set(outside)
        keep = [i for i, p in enumerate(collection.paths) if p not in skip]
        description = collection.description
        collection = collection.subset(keep)
        collection.description = description
    collection.roots, collection.outside = real_roots, outside
    return collection


def is_inside(path: str | os.PathLike, real_roots: Sequence[str]) -> bool:
    """Whether the real path of `path` (links resolved) is inside one of `real_roots` (real paths)."""
    real = os.path.realpath(path)
    return any(is_inside_folder(real, root) for root in real_roots)


def is_inside_folder(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or below it, comparing the strings as given (nothing resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _from_files(collection: Collection) -> list[bool]:
    """Whether each item is read from a file (a path), not from bytes (dataset rows without a file)."""
    images = collection.images
    base = images.base if isinstance(images, Subset) else images
    if isinstance(base, _HFImageBytes):
        return [False] * len(collection)
    return [isinstance(image, (str, os.PathLike)) for image in images]


@dataclass
class _Rows:
    """What a source lists, before de-duplication: one entry per row of the source."""

    paths: list[str]
    images: Sequence[Any]
    captions: list[str | None] | None
    extra: dict[str, list[Any]]
    description: str
    keys: list[str] | None = None  # defaults to the paths
    roots: list[str] = field(default_factory=list)  # the folders the files are expected in


def _open_rows(source: Any, image_column: str | None, caption_column: str | None, split: str | None) -> _Rows:
    if _is_hf(source):
        return _hf_rows(source, image_column, caption_column, split)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"cannot index a {type(source).__name__}: give a folder, a list file, a table "
            f"({', '.join(TABLE_SUFFIXES)}) or a Hugging Face dataset"
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a folder of images, a list file or a table")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _HF_MARKERS):
            return _hf_rows(_load_from_disk(path), image_column, caption_column, split)
        return _folder_rows(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        return _table_rows(path, image_column, caption_column)
    if suffix in LIST_SUFFIXES:
        return _list_rows(path)
    if suffix in IMAGE_EXTENSIONS:
        return _folder_rows(path)
    raise ValueError(
        f"cannot tell what {path} is from its extension {suffix!r}: use a folder, a list file "
        f"({', '.join(LIST_SUFFIXES)}), a table ({', '.join(TABLE_SUFFIXES)}) or a saved Hugging Face dataset"
    )


def _finish(rows: _Rows, modality: str) -> Collection:
    keys = rows.keys or rows.paths
    if modality == "text":
        if rows.captions is None:
            raise ValueError(
                f"a caption index needs captions, and {rows.description} has none; give a table with a caption column"
            )
        keys = [f"{k}\n{c}" for k, c in zip(keys, rows.captions)]
    keep, seen = [], set()
    for i, key in enumerate(keys):
        if key in seen or (modality == "text" and not rows.captions[i]):
            continue
        seen.add(key)
        keep.append(i)
    if len(keep) < len(keys):
        logger.info(
            "%s: %d rows repeat an item listed before (or have no caption, for a caption index); each item is indexed once",
            rows.description,
            len(keys) - len(keep),
        )
    collection = Collection(
        keys=keys,
        paths=rows.paths,
        images=rows.images,
        captions=rows.captions,
        extra=rows.extra,
        modality=modality,
        description=rows.description,
    )
    if len(keep) < len(keys):
        collection = collection.subset(keep)
        collection.description = rows.description
    return collection


def _folder_rows(root: Path) -> _Rows:
    files = find_images(root)
    base = root if root.is_dir() else root.parent
    paths = [str(p.resolve()) for p in files]
    folders = [p.parent.relative_to(base).as_posix() if p.parent != base else "" for p in files]
    logger.info("%s: %d images", root, len(paths))
    return _Rows(paths, paths, None, {"folder": folders}, f"folder {root} ({len(paths)} images)", roots=[str(base)])


def _listed_folders(paths: Sequence[str]) -> list[str]:
    """The folders of `paths` (absolute, as written: links not resolved), without those inside another."""
    folders: list[str] = []
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}, key=lambda f: f.split(os.sep)):
        if not folders or not is_inside_folder(folder, folders[-1]):
            folders.append(folder)
    return folders


def _list_rows(path: Path) -> _Rows:
    names, captions = [], []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, caption = line.partition("\t")
        names.append(name.strip())
        captions.append(caption.strip() or None)
    paths = [resolve_image_path(name, path.parent) for name in names]
    roots = _listed_folders([written_image_path(name, path.parent) for name in names])
    has_captions = any(c is not None for c in captions)
    description = f"list {path} ({len(paths)} lines)"
    return _Rows(paths, paths, captions if has_captions else None, {}, description, roots=roots)


def _table_rows(path: Path, image_column: str | None, caption_column: str | None) -> _Rows:
    records = read_table(path)
    columns = list(records[0].keys()) if records else []
    image_col = _pick_column(columns, image_column, IMAGE_COLUMNS, path, "image", required=True)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, path, "caption", required=False)
    paths = [resolve_image_path(str(r[image_col]), path.parent) for r in records]
    roots = _listed_folders([written_image_path(str(r[image_col]), path.parent) for r in records])
    captions = (
        [None if r.get(caption_col) in (None, "") else str(r[caption_col]) for r in records] if caption_col else None
    )
    extra = {_column_name(c): [r.get(c) for r in records] for c in columns if c not in (image_col, caption_col)}
    return _Rows(paths, paths, captions, extra, f"table {path} ({len(records)} rows)", roots=roots)


def _pick_column(
    columns: list[str], given: str | None, candidates: Sequence[str], source: Any, what: str, *, required: bool
) -> str | None:
    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{source} has no column {given!r} (columns: {', '.join(columns)}); pick one with --{what}-column"
            )
        return given
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    if required:
        raise ValueError(
            f"cannot find the {what} column of {source} among {', '.join(columns) or 'no columns'}; "
            f"name it with --{what}-column (looked for {', '.join(candidates)})"
        )
    return None


def _column_name(name: str) -> str:
    """A metadata-safe column name: other characters become '_' (an "image url" column becomes image_url)."""
    clean = _NOT_IDENT.sub("_", str(name)).strip("_") or "column"
    clean = f"c_{clean}" if clean[0].isdigit() else clean
    return f"{clean}_" if clean.lower() in ("id", "key", "path", "caption") else clean


# ---- Hugging Face datasets -------------------------------------------------------------------------
def _is_hf(source: Any) -> bool:
    module = type(source).__module__ or ""
    return module.startswith("datasets") and type(source).__name__ in ("Dataset", "DatasetDict")


def _load_from_disk(path: Path) -> Any:
    import datasets

    return datasets.load_from_disk(str(path))


def _hf_rows(ds: Any, image_column: str | None, caption_column: str | None, split: str | None) -> _Rows:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) != 1:
            raise ValueError(f"the dataset has splits {list(ds)}; choose one with --split")
        ds = ds[split or next(iter(ds))]
    columns = list(ds.column_names)
    image_types = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    image_col = image_column or (image_types[0] if image_types else None)
    image_col = _pick_column(columns, image_col, IMAGE_COLUMNS, "the dataset", "image", required=True)
    caption_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "the dataset", "caption", required=False)
    name = f"dataset {getattr(ds, 'info', None) and ds.info.dataset_name or ds._fingerprint} ({len(ds)} rows)"
    keys, paths, images = _hf_images(ds, image_col)
    captions = [None if c in (None, "") else str(c) for c in ds[caption_col]] if caption_col else None
    extra = {_column_name(c): _hf_column(ds, c) for c in columns if c not in (image_col, caption_col)}
    roots = _listed_folders(images) if isinstance(images, list) else []
    return _Rows(paths, images, captions, extra, name, keys=keys, roots=roots)


def _hf_column(ds: Any, column: str) -> list[Any]:
    import datasets

    feature, values = ds.features[column], ds[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    return [v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str) for v in values]


def _hf_images(ds: Any, column: str) -> tuple[list[str], list[str], Sequence[Any]]:
    """Keys, paths and loadable sources. Image features are read undecoded: a file path where the dataset
    has one (the loader opens it), else the encoded bytes, fetched lazily by `_HFImageBytes`."""
    import datasets

    if not isinstance(ds.features[column], datasets.Image):
        paths = [str(p) for p in ds[column]]
        return paths, paths, paths
    raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    file_paths = [
        r["path"] if r["path"] and os.path.isfile(r["path"]) else None
        for batch in raw.iter(batch_size=1000)
        for r in batch[column]
    ]
    counts = Counter(file_paths)
    # The same file listed twice is one item; rows without a file (bytes only) are each their own item.
    keys = [p if p is not None and counts[p] == 1 else f"hf:{ds._fingerprint}/{i}" for i, p in enumerate(file_paths)]
    if all(p is not None for p in file_paths):
        return keys, file_paths, file_paths
    return keys, keys, _HFImageBytes(raw, column)


class _HFImageBytes(Sequence):
    """Row i's encoded image bytes (or file path), read on demand from the memory-mapped dataset."""

    def __init__(self, ds: Any, column: str) -> None:
        self.ds, self.column = ds, column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        value = self.ds[int(i)][self.column]
        return value["bytes"] if value.get("bytes") is not None else value["path"]
