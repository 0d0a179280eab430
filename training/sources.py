"""Where image-text pairs come from: tables, Hugging Face datasets and streamed tar shards.

Every source hands out `Record`s: an image (a path, encoded bytes or a PIL image, anything
`vlm.load_image` reads), a caption and a name for error messages. Nothing is decoded here: decoding
happens in DataLoader workers, where a bad sample is caught and skipped.

Tables and datasets are read by `vlm.data` (the reader, the ``hf:`` spec and the column names every
verb uses); what is training's own is how they are served:

- Tables (CSV, TSV, JSONL, JSON, Parquet) and Hugging Face datasets held on disk are indexable
  (`MapSource`): they are shuffled by index, and an epoch is `len // batch` steps.
- Tar shards (the webdataset layout: ``key.jpg`` + ``key.txt`` per sample, ``key.cls`` an integer label)
  are streamed (`StreamSource`) through `datasets`' webdataset reader, shuffled by shard and through a buffer.
"""

from __future__ import annotations

import abc
import glob
import logging
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from vlm.data import is_tar_spec, load_hf_dataset, pick_column, read_table, source_kind
from vlm.data.hf import image_columns, keep_encoded, undecoded
from vlm.data.tables import TABLE_FORMATS, image_cell, read_list, table_format

from .config import DataConfig, setting_errors

__all__ = [
    "Record",
    "MapSource",
    "TableSource",
    "HFSource",
    "StreamSource",
    "open_source",
    "open_pairs",
    "expand_shards",
]

logger = logging.getLogger(__name__)

IMAGEFOLDER_MARKERS = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
PAIRS_HELP = "give a table with image and text columns, hf:NAME_OR_DIR, or tar shards"


@dataclass(frozen=True)
class Record:
    """One sample before decoding."""

    image: Any  # path (str), encoded bytes or a PIL image
    text: Any  # the caption; None or "" is a bad sample
    name: str  # the file, or the shard and key, for messages
    label: Any = None


class MapSource(abc.ABC):
    """An indexable collection of records."""

    description: str = ""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Record: ...

    def records(self, limit: int = 0) -> list[Record]:
        """The first `limit` records (all of them when `limit` <= 0), undecoded."""
        n = len(self) if limit <= 0 else min(limit, len(self))
        return [self[i] for i in range(n)]


@dataclass(frozen=True)
class Columns:
    """The columns of the image, the caption (None when not needed) and the label (None unless asked for)."""

    image: str
    text: str | None
    label: str | None


def _columns(
    available: list[str],
    where: str,
    *,
    image: str | None,
    text: str | None,
    label: str | None,
    prefer_image: tuple[str, ...] = (),
    need_text: bool = True,
    need_label: bool = False,
) -> Columns:
    """The image, text and label columns, checked against what `where` has (`vlm.data.pick_column`)."""
    return Columns(
        image=pick_column(available, "image", image, where=where, prefer=prefer_image),
        text=pick_column(available, "text", text, where=where) if need_text or text else None,
        label=pick_column(available, "label", label, where=where) if need_label or label else None,
    )


class TableSource(MapSource):
    """A CSV, TSV, JSONL, JSON or Parquet table (or a list file) of image paths (or bytes) and captions."""

    def __init__(
        self,
        path: str | Path,
        *,
        format: str = "auto",
        image_column: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        image_root: str | Path | None = None,
        need_text: bool = True,
        need_label: bool = False,
    ) -> None:
        self.path = Path(path)
        self.table = read_list(self.path) if format == "list" else read_table(self.path, format)
        self.columns = _columns(
            self.table.column_names,
            f"table {self.path}",
            image=image_column,
            text=text_column,
            label=label_column,
            need_text=need_text,
            need_label=need_label,
        )
        self.root = str(image_root) if image_root else str(self.path.parent)
        column = lambda name: self.table.column(name) if name else None  # noqa: E731
        self._images, self._texts, self._labels = (column(n) for n in (self.columns.image, self.columns.text, self.columns.label))
        self.description = f"{self.path} ({len(self)} rows)"

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Record:
        image = image_cell(self._images[index], self.root)
        text = self._texts[index] if self._texts is not None else None
        label = self._labels[index] if self._labels is not None else None
        name = image if isinstance(image, str) else f"{self.path} row {index}"
        return Record(image, text, name, label)


class HFSource(MapSource):
    """A Hugging Face `datasets.Dataset` with an image and a text column (images left encoded)."""

    def __init__(
        self,
        dataset: Any,
        *,
        image_column: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        description: str = "dataset",
        need_text: bool = True,
        need_label: bool = False,
    ) -> None:
        self.columns = c = _columns(
            list(dataset.column_names),
            description,
            image=image_column,
            text=text_column,
            label=label_column,
            prefer_image=tuple(image_columns(dataset)),
            need_text=need_text,
            need_label=need_label,
        )
        self.dataset = keep_encoded(dataset, c.image).select_columns([n for n in (c.image, c.text, c.label) if n])
        label_feature = dataset.features.get(c.label) if c.label else None
        self._label_names = getattr(label_feature, "names", None)
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        c = self.columns
        row = self.dataset[int(index)]
        image = undecoded(row[c.image])
        label = row[c.label] if c.label else None
        if self._label_names is not None and isinstance(label, int):
            label = self._label_names[label]
        name = image if isinstance(image, str) else f"{self.description} row {index}"
        return Record(image, row[c.text] if c.text else None, name, label)


def _webdataset_builder(shards: list[str]) -> Any:
    """`datasets`' webdataset builder reading ``.cls`` as text: its own decoder calls int() inside the
    iterator, where a bad label cannot be named; `StreamSource` parses it, naming shard and key."""
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    class _Shards(WebDataset):
        DECODERS = {**WebDataset.DECODERS, "cls": _text, "cls2": _text}

    return _Shards(data_files={"train": shards})


def _text(data: bytes) -> str:
    return data.decode("utf-8")


class StreamSource:
    """Tar shards read sequentially: shuffled by shard and through a buffer, split across processes."""

    def __init__(
        self,
        shards: list[str],
        *,
        image_column: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        shuffle_buffer: int = 1000,
        need_text: bool = True,
        need_label: bool = False,
    ) -> None:
        self.shards = shards
        self.shuffle_buffer = shuffle_buffer
        dataset = _webdataset_builder(shards).as_streaming_dataset(split="train")
        self.columns = c = _columns(
            [n for n in (dataset.features or {}) if not n.startswith("__")],
            f"tar shards {shards[0]}{' ...' if len(shards) > 1 else ''}",
            image=image_column,
            text=text_column,
            label=label_column,
            need_text=need_text,
            need_label=need_label,
        )
        self.dataset = keep_encoded(dataset, c.image)
        self.description = f"{len(shards)} tar shard(s) from {shards[0]}"

    def iterate(self, *, epoch: int, seed: int, rank: int, world_size: int, skip: int = 0) -> Iterator[Record]:
        """The records of `epoch` for process `rank`, after the first `skip` of them."""
        from datasets.distributed import split_dataset_by_node

        ds = self.dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        # After the split: derived datasets do not inherit the epoch.
        ds.set_epoch(epoch)
        # Records are read and dropped rather than `ds.skip(n)`, which fixes the shard order across
        # epochs and so would not continue the order of an uninterrupted run.
        return self._records(islice(ds, skip, None))

    def _records(self, rows: Iterator[dict]) -> Iterator[Record]:
        c = self.columns
        for row in rows:
            name = f"{row['__url__']}:{row['__key__']}"
            label = _label(row[c.label], c.label, name) if c.label else None
            yield Record(undecoded(row[c.image]), row[c.text] if c.text else None, name, label)

    def records(self, limit: int = 0) -> list[Record]:
        """The first `limit` records in shard order (0: all), for evaluation sets."""
        rows = self._records(iter(self.dataset))
        return list(islice(rows, limit) if limit else rows)


def _label(value: Any, column: str, name: str) -> Any:
    """A sample's label; a ``.cls`` must be an integer (webdataset's class index)."""
    if column.lower() not in ("cls", "cls2") or value is None:
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"tar sample {name} has .{column} {value!r}, not an integer; webdataset's .{column} holds the class "
            "number (0, 1, ...): write the number, or put class names in a .txt or .json field and name it with "
            "eval.label_column"
        ) from None


def expand_shards(spec: str) -> list[str]:
    """Shard files from a brace range (``shard-{00000..00099}.tar``), a glob, or a comma-separated list."""
    out: list[str] = []
    for part in spec.split(","):
        for name in _expand_braces(part.strip()):
            matches = sorted(glob.glob(name)) if any(c in name for c in "*?[") else [name]
            out.extend(matches)
    missing = [s for s in out if "://" not in s and not Path(s).is_file()]
    if not out or missing:
        raise FileNotFoundError(f"no tar shards found for {spec!r}" + (f" (missing: {missing[:3]})" if missing else ""))
    return out


def _expand_braces(spec: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not match:
        return [spec]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    head, tail = spec[: match.start()], spec[match.end() :]
    return [n for i in range(int(lo), int(hi) + 1) for n in _expand_braces(f"{head}{i:0{width}d}{tail}")]


def _detect_format(spec: str) -> str:
    if is_tar_spec(spec):
        return "webdataset"
    kind = source_kind(spec)
    if kind == "table":
        return table_format(spec) or ""
    if kind == "folder":
        if any(next(Path(spec).rglob(m), None) for m in IMAGEFOLDER_MARKERS):
            return "imagefolder"
        raise ValueError(
            f"{spec} is a folder of images without texts; training needs image-text pairs: {PAIRS_HELP}, or "
            f"an imagefolder with a metadata.jsonl of file_name and text"
        )
    if kind == "image":
        raise ValueError(f"{spec} is an image, not a source of image-text pairs; {PAIRS_HELP}")
    return kind  # "hf", or "list": a list file's ``path<TAB>text`` lines are pairs too


def open_source(
    spec: str,
    *,
    format: str = "auto",
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    image_root: str | None = None,
    split: str = "train",
    shuffle_buffer: int = 1000,
    need_text: bool = True,
    need_label: bool = False,
) -> MapSource | StreamSource:
    """The source `spec` names (see the module docstring); columns are checked here, once."""
    if not spec:
        raise ValueError(f"no data given: set data.train (or data.sources); {PAIRS_HELP}")
    from .remote import RemoteTableSource, is_remote, local_path  # remote builds on TableSource

    spec = local_path(spec)
    columns = dict(
        image_column=image_column,
        text_column=text_column,
        label_column=label_column,
        need_text=need_text,
        need_label=need_label,
    )
    if is_remote(spec) and not is_tar_spec(spec) and format in ("auto", *TABLE_FORMATS.values(), "list"):
        return RemoteTableSource(spec, format=format, image_root=image_root, **columns)
    fmt = _detect_format(spec) if format == "auto" else format
    if fmt in (*TABLE_FORMATS.values(), "list"):
        return TableSource(spec, format=fmt, image_root=image_root, **columns)
    if fmt == "webdataset":
        return StreamSource(expand_shards(spec), shuffle_buffer=shuffle_buffer, **columns)
    builder = "imagefolder" if fmt == "imagefolder" else None
    return HFSource(load_hf_dataset(spec, split, builder=builder), description=f"{spec} [{split}]", **columns)


def open_pairs(data: DataConfig, *, held_out: bool = False) -> MapSource | StreamSource:
    """The training pairs (`data.train`) or the held-out pairs (`data.eval`) of a config; errors name the
    setting, and an indexable source without a row is one."""
    if data.sources and not held_out:
        return _open_mix(data)
    spec, split = (data.eval, data.eval_split) if held_out else (data.train, data.split)
    return _open_pairs_at("data.eval" if held_out else "data.train", spec, split, data)


def _open_mix(data: DataConfig) -> MapSource:
    """data.sources as one `training.mixing.MixedSource`; each error names its entry."""
    from .mixing import MixedSource  # mixing builds on the loader's keys, which build on this module

    sources = []
    for i, entry in enumerate(data.sources):
        key = f"data.sources[{i}].train"
        if is_tar_spec(entry.train) or data.format == "webdataset":
            raise ValueError(
                f"{key}={entry.train}: tar shards are streamed and cannot be mixed by weight (a mix resumes from its "
                "step, which needs sources of known length); give a table or a dataset, or train on the shards "
                "alone with data.train"
            )
        sources.append(_open_pairs_at(key, entry.train, data.split, data))
    names = [entry.train for entry in data.sources]
    return MixedSource(sources, [entry.weight for entry in data.sources], names)


def _open_pairs_at(key: str, spec: str | None, split: str, data: DataConfig) -> MapSource | StreamSource:
    if not spec:
        return open_source(spec)  # the error of no data at all
    with setting_errors(key, spec):
        source = open_source(
            spec,
            format=data.format,
            image_column=data.image_column,
            text_column=data.text_column,
            image_root=data.image_root,
            split=split,
            shuffle_buffer=data.shuffle_buffer,
        )
        if isinstance(source, MapSource) and len(source) == 0:
            raise ValueError(
                f"{source.description} is empty: it has no image-text pairs (a table with only its header row?); "
                f"add rows to it, or point {key} at a source of image-text pairs"
            )
    return source
