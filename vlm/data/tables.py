"""Tables of image paths and their columns: CSV, TSV, JSON Lines, JSON and Parquet, and list files.

One reader for every verb. The format comes from the suffix (training configs may name it with
`data.format`). CSV and TSV cells are read as text (an image named "0001" stays "0001"); CSV, TSV
and Parquet stay Arrow columns, so a training table of millions of rows is not held as Python objects.

One image-path rule: a cell names an image relative to the table's folder (or a given root), with `~`
expanded; a cell may also hold the encoded image (bytes, or Hugging Face's ``{"bytes", "path"}``).
A list file (``.txt``, ``.lst``, ``.list``) is a one-column table: a path a line, optionally
``path<TAB>text``; blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = [
    "TABLE_FORMATS",
    "TABLE_SUFFIXES",
    "LIST_SUFFIXES",
    "Table",
    "table_format",
    "is_table",
    "read_table",
    "read_list",
    "image_cell",
    "resolve_image_path",
    "written_image_path",
]

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
TABLE_SUFFIXES = tuple(TABLE_FORMATS)
LIST_SUFFIXES = (".txt", ".lst", ".list")


def table_format(path: str | os.PathLike, format: str = "auto") -> str | None:
    """The table format of `path` by its suffix ("auto"), or `format` itself; None when not a table."""
    if format != "auto":
        return format if format in TABLE_FORMATS.values() else None
    return TABLE_FORMATS.get(Path(path).suffix.lower())


def is_table(path: str | os.PathLike) -> bool:
    """Whether `path` names a file with one of the table suffixes (it need not exist)."""
    return table_format(path) is not None


class _ArrowColumn(Sequence):
    """One column of an Arrow table as Python values, converted one cell at a time."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        return self.data[int(index)].as_py()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data.to_pylist())


class Table:
    """A table read whole: its column names, its length, and each column as a sequence of values."""

    def __init__(self, path: Path, columns: dict[str, Sequence[Any]], num_rows: int) -> None:
        self.path, self._columns, self.num_rows = path, columns, num_rows

    @property
    def column_names(self) -> list[str]:
        """The table's columns, in file order (the name `datasets.Dataset` gives them)."""
        return list(self._columns)

    def __len__(self) -> int:
        return self.num_rows

    def column(self, name: str) -> Sequence[Any]:
        """The values of column `name` (KeyError when the table has no such column)."""
        return self._columns[name]

    def rows(self) -> list[dict[str, Any]]:
        """Every row as a dict keyed by column name."""
        values = [list(self._columns[name]) for name in self._columns]
        return [dict(zip(self._columns, row)) for row in zip(*values)]


def read_table(path: str | os.PathLike, format: str = "auto") -> Table:
    """The table at `path` (`format`: csv, tsv, jsonl, json, parquet, or "auto" by suffix).

    Raises FileNotFoundError when it does not exist and ValueError naming the file when it cannot be
    read or parsed."""
    path = Path(path)
    fmt = table_format(path, format)
    if fmt is None:
        raise ValueError(
            f"cannot tell the table format of {path}; give a {', '.join(TABLE_SUFFIXES)} file "
            "(or set data.format in a training config)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"the table {path} does not exist; give an existing {', '.join(TABLE_SUFFIXES)} file")
    import pyarrow as pa

    try:
        if fmt in ("json", "jsonl"):
            return _python_table(path, _json_rows(path, fmt))
        data = _read_csv(path, fmt) if fmt in ("csv", "tsv") else _read_parquet(path)
    except (OSError, ValueError, csv.Error, pa.ArrowException) as err:
        raise ValueError(f"cannot read the table {path} as {fmt}: {err}") from err
    return Table(path, {name: _ArrowColumn(data.column(name)) for name in data.column_names}, data.num_rows)


def _read_csv(path: Path, fmt: str) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    delimiter = "\t" if fmt == "tsv" else ","
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    # Every column as text: an image name such as "0001" must not become the number 1.
    convert = pcsv.ConvertOptions(column_types={name: pa.string() for name in header})
    parse = pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    return pcsv.read_csv(path, parse_options=parse, convert_options=convert)


def _read_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _json_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    # Python's reader, not Arrow's: a column may mix numbers and names (labels such as 3 and "cat").
    if fmt == "json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError("a JSON table must be a list of objects, one per row")
    else:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    bad = next((i for i, row in enumerate(rows, 1) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ValueError(f"row {bad} is not an object; write one JSON object per row")
    return rows


def _python_table(path: Path, rows: list[dict[str, Any]]) -> Table:
    names = list(dict.fromkeys(name for row in rows for name in row))
    return Table(path, {name: [row.get(name) for row in rows] for name in names}, len(rows))


def read_list(path: str | os.PathLike) -> Table:
    """A list file as a table: the column ``image``, and ``text`` when some line has one (else None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the list file {path} does not exist; give a file with one image path a line")
    images, texts = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, text = line.partition("\t")
        images.append(name.strip())
        texts.append(text.strip() or None)
    columns: dict[str, Sequence[Any]] = {"image": images}
    if any(text is not None for text in texts):
        columns["text"] = texts
    return Table(path, columns, len(images))


def image_cell(value: Any, base: str | os.PathLike) -> Any:
    """A table cell as something `vlm.load_image` reads: a path by `resolve_image_path`, encoded bytes as
    they are, and Hugging Face's undecoded ``{"bytes", "path"}`` as its bytes (else its path)."""
    if isinstance(value, dict):
        return value.get("bytes") or image_cell(value.get("path"), base)
    if isinstance(value, str):
        return resolve_image_path(value, base)
    return value


def resolve_image_path(name: str, base: str | os.PathLike) -> str:
    """An image path from a table cell: `~` expanded, and relative paths taken from `base` (the
    table's folder), as an absolute path with links resolved."""
    return str(Path(written_image_path(name, base)).resolve())


def written_image_path(name: str, base: str | os.PathLike) -> str:
    """The absolute path a table cell names, as written: `~` expanded, relative paths taken from `base`,
    `..` removed, links not followed."""
    return os.path.abspath(os.path.join(base, os.path.expanduser(name)))
