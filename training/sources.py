"""Where image-text pairs come from: tables, Hugging Face datasets and streamed tar shards.

Every source hands out `Record`s: an image (a path, encoded bytes or a PIL image, anything
`vlm.load_image` reads), a caption and a name for error messages. Nothing is decoded here: decoding
happens in DataLoader workers, where a bad sample is caught and skipped.

- Tables (CSV, TSV, JSONL, Parquet) and Hugging Face datasets held on disk are indexable
  (`MapSource`): they are shuffled by index, and an epoch is `len // batch` steps.
- Tar shards (the webdataset layout: ``key.jpg`` + ``key.txt`` per sample) are streamed
  (`StreamSource`) through `datasets`' webdataset reader, shuffled by shard and through a buffer.
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

from .config import DataConfig

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

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
TEXT_COLUMNS = ("caption", "text", "txt")
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
IMAGEFOLDER_MARKERS = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


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


def _pick_column(explicit: str | None, candidates: tuple[str, ...], available: list[str], what: str, where: str) -> str:
    setting = "eval.label_column" if what == "label" else f"data.{what}_column"
    if explicit is not None:
        if explicit not in available:
            raise ValueError(
                f"{where} has no {what} column {explicit!r}; its columns are {available}; set the right "
                f"name with {setting}=..."
            )
        return explicit
    for name in candidates:
        if name in available:
            return name
    raise ValueError(
        f"{where} has none of the usual {what} columns {list(candidates)}; its columns are {available}; "
        f"name yours with {setting}=..."
    )


@dataclass(frozen=True)
class Columns:
    """The table columns of the image, the caption (None when not needed) and the label (None unless asked for)."""

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
    image_candidates: tuple[str, ...] = ("image",),
    need_text: bool = True,
) -> Columns:
    """The image, text and label columns, checked against what `where` has."""
    return Columns(
        image=_pick_column(image, image_candidates, available, "image", where),
        text=_pick_column(text, TEXT_COLUMNS, available, "text", where) if need_text or text else None,
        label=_pick_column(label, (), available, "label", where) if label else None,
    )


def _image_value(value: Any, root: Path | None) -> Any:
    """A table cell as something load_image reads: paths resolved against `root`, bytes as they are."""
    if isinstance(value, dict):  # Hugging Face's Image(decode=False): {"bytes": ..., "path": ...}
        return value.get("bytes") or _image_value(value.get("path"), root)
    if isinstance(value, str) and root is not None and not Path(value).is_absolute():
        return str(root / value)
    return value


class TableSource(MapSource):
    """A CSV, TSV, JSONL or Parquet table of image paths (or bytes) and captions."""

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
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"table {self.path} does not exist; data.train (or data.eval) must name a file")
        fmt = TABLE_FORMATS.get(self.path.suffix.lower()) if format == "auto" else format
        if fmt is None:
            raise ValueError(f"cannot tell the format of {self.path}; set data.format to csv, tsv, jsonl or parquet")
        self.table = _read_table(self.path, fmt)
        self.columns = _columns(
            self.table.column_names,
            f"table {self.path}",
            image=image_column,
            text=text_column,
            label=label_column,
            need_text=need_text,
        )
        self.root = Path(image_root) if image_root else self.path.parent
        self._images = self.table.column(self.columns.image)
        self._texts = self.table.column(self.columns.text) if self.columns.text else None
        self._labels = self.table.column(self.columns.label) if self.columns.label else None
        self.description = f"{self.path} ({len(self)} rows)"

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> Record:
        image = _image_value(self._images[index].as_py(), self.root)
        text = self._texts[index].as_py() if self._texts is not None else None
        label = self._labels[index].as_py() if self._labels is not None else None
        name = image if isinstance(image, str) else f"{self.path} row {index}"
        return Record(image, text, name, label)


def _read_table(path: Path, fmt: str):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    try:
        if fmt in ("csv", "tsv"):
            # Every column as text: an image name such as "0001" must not become the number 1.
            with open(path, newline="") as f:
                header = f.readline().rstrip("\r\n").split("\t" if fmt == "tsv" else ",")
            convert = pcsv.ConvertOptions(column_types={name.strip('"'): pa.string() for name in header})
            parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
            return pcsv.read_csv(path, parse_options=parse, convert_options=convert)
        if fmt == "jsonl":
            return pjson.read_json(path)
        if fmt == "parquet":
            return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"cannot read {path} as {fmt}: {err}") from err
    raise ValueError(f"data.format {fmt!r} is not a table format; use csv, tsv, jsonl or parquet")


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
    ) -> None:
        import datasets

        image_features = [n for n, f in dataset.features.items() if isinstance(f, datasets.Image)]
        self.columns = c = _columns(
            list(dataset.column_names),
            description,
            image=image_column,
            text=text_column,
            label=label_column,
            image_candidates=(*image_features, "image"),
            need_text=need_text,
        )
        if isinstance(dataset.features[c.image], datasets.Image):
            # Decoding happens in our workers, where a broken image is skipped instead of raising here.
            dataset = dataset.cast_column(c.image, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([n for n in (c.image, c.text, c.label) if n])
        label_feature = dataset.features.get(c.label) if c.label else None
        self._label_names = getattr(label_feature, "names", None)
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Record:
        c = self.columns
        row = self.dataset[int(index)]
        image = _image_value(row[c.image], None)
        label = row[c.label] if c.label else None
        if self._label_names is not None and isinstance(label, int):
            label = self._label_names[label]
        name = image if isinstance(image, str) else f"{self.description} row {index}"
        return Record(image, row[c.text] if c.text else None, name, label)


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
    ) -> None:
        import datasets

        self.shards = shards
        self.shuffle_buffer = shuffle_buffer
        dataset = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        self.columns = c = _columns(
            list(dataset.features or {}),
            f"tar shards {shards[0]}{' ...' if len(shards) > 1 else ''}",
            image=image_column,
            text=text_column,
            label=label_column,
            image_candidates=WDS_IMAGE_KEYS,
            need_text=need_text,
        )
        if isinstance(dataset.features[c.image], datasets.Image):
            dataset = dataset.cast_column(c.image, datasets.Image(decode=False))
        self.dataset = dataset
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
            label = row[c.label] if c.label else None
            yield Record(_image_value(row[c.image], None), row[c.text] if c.text else None, name, label)

    def records(self, limit: int = 0) -> list[Record]:
        """The first `limit` records in shard order (0: all), for evaluation sets."""
        rows = self._records(iter(self.dataset))
        return list(islice(rows, limit) if limit else rows)


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
    if ".tar" in spec:
        return "webdataset"
    suffix = Path(spec).suffix.lower()
    if suffix in TABLE_FORMATS:
        return TABLE_FORMATS[suffix]
    path = Path(spec)
    if path.is_dir() and any((path / m).is_file() for m in HF_DISK_MARKERS):
        return "hf"
    if path.is_dir() and any(next(path.rglob(m), None) for m in IMAGEFOLDER_MARKERS):
        return "imagefolder"
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot tell the format of {spec}; set data.format (csv, tsv, jsonl or parquet)")
    return "hf"


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
) -> MapSource | StreamSource:
    """The source `spec` names (see the module docstring); columns are checked here, once."""
    if not spec:
        raise ValueError("no data given: set data.train to a table, a Hugging Face dataset or tar shards")
    fmt = _detect_format(spec) if format == "auto" else format
    columns = dict(image_column=image_column, text_column=text_column, label_column=label_column, need_text=need_text)
    if fmt in ("csv", "tsv", "jsonl", "parquet"):
        return TableSource(spec, format=fmt, image_root=image_root, **columns)
    if fmt == "webdataset":
        return StreamSource(expand_shards(spec), shuffle_buffer=shuffle_buffer, **columns)
    return HFSource(_load_hf(spec, fmt, split), description=f"{spec} [{split}]", **columns)


def open_pairs(data: DataConfig, *, held_out: bool = False) -> MapSource | StreamSource:
    """The training pairs (`data.train`) or the held-out pairs (`data.eval`) of a config."""
    spec, split = (data.eval, data.eval_split) if held_out else (data.train, data.split)
    return open_source(
        spec,
        format=data.format,
        image_column=data.image_column,
        text_column=data.text_column,
        image_root=data.image_root,
        split=split,
        shuffle_buffer=data.shuffle_buffer,
    )


def _load_hf(spec: str, fmt: str, split: str) -> Any:
    import datasets

    try:
        if fmt == "imagefolder":
            dataset = datasets.load_dataset("imagefolder", data_dir=spec, split=split)
        elif Path(spec).is_dir() and any((Path(spec) / m).is_file() for m in HF_DISK_MARKERS):
            dataset = datasets.load_from_disk(spec)
        else:
            dataset = datasets.load_dataset(spec, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise ValueError(f"cannot load the Hugging Face dataset {spec!r} (split {split!r}): {err}") from err
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{spec} has splits {list(dataset)}, not {split!r}; set data.split (or data.eval_split)")
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"{spec} loaded as {type(dataset).__name__}; vlm trains on a map-style datasets.Dataset")
    return dataset
