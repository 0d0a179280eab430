"""Collections to index: anything `vlm.data.open_images` reads (a folder, a list file, a table, a
Hugging Face dataset), with what retrieval adds: a modality, one item per key, and roots.

- Folder: every image below it; the extra column ``folder`` holds each image's folder relative to the
  root ("" at the root), so a search can be restricted to one folder.
- List file, table, Hugging Face dataset: as `vlm.data` reads them. The text column (named with
  `text_column`, else found by name: ``caption``, ``text``...) gives the captions; every other column
  becomes metadata (``label``, ``split``...; class labels as their names), its name made safe for SQL.

Every item has a `key`, its identity across updates: the image's absolute path (or
``hf:<fingerprint>/<row>`` for dataset images without one); in a caption collection
(``modality="text"``) the key is path + caption.

**Roots.** A collection lists only files inside its roots: the folders the user gives (`roots=`, `--root`),
by default the folder itself, or, for a list file, a table or a dataset of files, the folders its rows
name (each once, without those inside another). A file whose real path (links resolved) lies outside
them, such as a link in the folder that points elsewhere, is left out and reported in
`Collection.outside`; the index records the roots, and the service serves files from them and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from vlm.data import HFImageColumn, ImageCollection, Subset, is_inside_folder, open_images

__all__ = ["Collection", "Subset", "open_source", "keep_inside", "is_inside", "is_inside_folder", "MODALITIES"]

logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")
_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]")


@dataclass
class Collection(ImageCollection):
    """Items to embed: a `vlm.data.ImageCollection` (`images` is its `sources`) of one `modality`, with the
    `roots` its files must lie in and the files left `outside` them."""

    modality: str = "image"
    roots: list[str] = field(default_factory=list)  # real paths of the folders the files must lie in
    outside: list[str] = field(default_factory=list)  # files left out: their real path is outside the roots

    @property
    def images(self) -> Sequence[Any]:
        """What `vlm.load_image` reads for each item (a path or encoded bytes, loaded lazily)."""
        return self.sources

    def digest(self) -> str:
        """A hash of the keys in order: identifies this exact list of items (for resuming jobs)."""
        h = hashlib.sha256(self.modality.encode())
        for key in self.keys:
            h.update(key.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()[:16]

    def texts(self) -> list[str]:
        """The captions, None as ""; ValueError when the collection has none."""
        if self.captions is None:
            raise ValueError(f"{self.description} has no captions; give a table with a text column (--text-column)")
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


def open_source(
    source: Any,
    *,
    modality: str = "image",
    image_column: str | None = None,
    text_column: str | None = None,
    split: str | None = None,
    roots: Sequence[str | os.PathLike] | None = None,
) -> Collection:
    """The `Collection` of `source`: a folder, list file, table, HF dataset (``hf:NAME_OR_DIR``, a saved
    directory or a `datasets` object), without the files outside `roots` (default: the source's own
    folders; see the module docstring)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    found = open_images(source, split=split, image_column=image_column, text_column=text_column)
    return keep_inside(_one_per_key(found, modality), found.folders if roots is None else roots)


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


def _from_files(collection: Collection) -> list[bool]:
    """Whether each item is read from a file (a path), not from bytes (dataset rows without a file)."""
    images = collection.images
    base = images.base if isinstance(images, Subset) else images
    if isinstance(base, HFImageColumn):
        return [False] * len(collection)
    return [isinstance(image, (str, os.PathLike)) for image in images]


def _one_per_key(found: ImageCollection, modality: str) -> Collection:
    """`found` as a Collection of `modality` with metadata-safe columns, each key once (and, for captions,
    only the rows with one)."""
    fields = {f.name: getattr(found, f.name) for f in dataclasses.fields(ImageCollection)}
    fields["extra"] = {_column_name(c): [_scalar(v) for v in values] for c, values in found.extra.items()}
    collection = Collection(**fields, modality=modality)
    if modality == "text":
        if found.captions is None:
            raise ValueError(
                f"a caption index needs captions, and {found.description} has none; give a table with a text "
                "column (--text-column)"
            )
        collection.keys = [f"{k}\n{c}" for k, c in zip(found.keys, found.captions)]
    keep, seen = [], set()
    for i, key in enumerate(collection.keys):
        if key in seen or (modality == "text" and not found.captions[i]):
            continue
        seen.add(key)
        keep.append(i)
    if len(keep) < len(collection):
        logger.info(
            "%s: %d rows repeat an item listed before (or have no caption, for a caption index); each item is indexed once",
            found.description,
            len(collection) - len(keep),
        )
        collection = collection.subset(keep)
        collection.description = found.description
    return collection


def _scalar(value: Any) -> Any:
    """A metadata value SQLite stores: scalars as they are, anything else as JSON."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, default=str)


def _column_name(name: str) -> str:
    """A metadata-safe column name: other characters become '_' (an "image url" column becomes image_url)."""
    clean = _NOT_IDENT.sub("_", str(name)).strip("_") or "column"
    clean = f"c_{clean}" if clean[0].isdigit() else clean
    return f"{clean}_" if clean.lower() in ("id", "key", "path", "caption") else clean
