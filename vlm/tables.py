"""Reading small tables of image paths and their columns: CSV, TSV, JSON Lines, JSON and Parquet.

One reader for every part of the library that takes a table from a user (retrieval's collections,
zero-shot evaluation and fine-tuning data). Training's streaming reader keeps Arrow tables instead,
for tables too large to hold as Python rows.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TABLE_SUFFIXES", "is_table", "read_table", "resolve_image_path"]

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def is_table(path: str | os.PathLike) -> bool:
    """Whether `path` names a file with one of the table suffixes (it need not exist)."""
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of the table at `path` as dicts keyed by column name (CSV and TSV values are strings).

    Raises ValueError naming the file when it cannot be read or parsed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path} is not a table; give a {', '.join(TABLE_SUFFIXES)} file")
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError("a JSON table must be a list of objects")
            return data
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, ValueError, csv.Error) as err:
        raise ValueError(f"cannot read the table {path}: {err}") from err


def resolve_image_path(name: str, base: str | os.PathLike) -> str:
    """An image path from a table cell: `~` expanded, and relative paths taken from `base` (the
    table's folder), as an absolute path with links resolved."""
    return str(Path(written_image_path(name, base)).resolve())


def written_image_path(name: str, base: str | os.PathLike) -> str:
    """The absolute path a table cell names, as written: `~` expanded, relative paths taken from `base`,
    `..` removed, links not followed."""
    return os.path.abspath(os.path.join(base, os.path.expanduser(name)))
