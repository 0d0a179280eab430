"""Item metadata in SQLite: id -> path, caption and any extra columns (folder, label, ...).

One table, ``items(id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, path TEXT, caption TEXT, <extra>)``:
`key` is the item's identity across updates (the image path; path + caption in a caption index).
Filters are SQL boolean expressions over those columns (``label = 'cat'``, ``folder LIKE 'animals/%'``),
run as ``SELECT id FROM items WHERE (<filter>)`` on a read-only connection with an authorizer that allows
reading and nothing else, so a filter typed into a search box cannot change or attach anything.

A store keeps one connection, opened on first use and shared by the threads of a service under a lock
(lookups take microseconds). Holding it open also keeps the file readable after an update has removed
the version it belongs to.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["Item", "MetadataStore", "METADATA_FILE", "check_column_name"]

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.sqlite"
BASE_COLUMNS = ("id", "key", "path", "caption")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION}
_BATCH = 900  # ids per IN (...) query: under SQLite's default limit of 999 parameters


@dataclass(frozen=True)
class Item:
    """One indexed item: its id, where its image (or caption) came from, and its extra columns."""

    id: int
    key: str
    path: str
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_column_name(name: str) -> str:
    """`name`, if usable as an extra column (an SQL identifier of at most 64 characters, not id, key, path
    or caption); else ValueError telling to rename the column."""
    if not _IDENT.match(name) or name.lower() in BASE_COLUMNS:
        raise ValueError(
            f"metadata column name {name!r} is not usable: names are letters, digits and underscores "
            f"(not starting with a digit) and not one of {BASE_COLUMNS}; rename the column in your table"
        )
    return name


class MetadataStore:
    """The SQLite file of an index version; writable only while an update builds that version."""

    def __init__(self, path: str | Path, *, writable: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        if not writable and not self.path.is_file():
            raise ValueError(f"metadata file {self.path} is missing; rebuild the index with `vlm index build`")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._columns: list[str] | None = None

    # ---- connections ----------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        """The store's one SQLite connection, opened on first use (thread-safe)."""
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
            return self._conn

    def _connect(self) -> sqlite3.Connection:
        if self.writable:
            conn = sqlite3.connect(self.path)
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
            return conn
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Closes the connection; the next use opens a new one."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- writing --------------------------------------------------------------------------------
    def create(self, extra_columns: Sequence[str] = ()) -> None:
        """Creates and commits the empty ``items`` table with the base columns plus `extra_columns`;
        ValueError for an unusable column name."""
        cols = "".join(f', "{check_column_name(c)}"' for c in extra_columns)
        self.conn.execute(
            f"CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, path TEXT, caption TEXT{cols})"
        )
        self.conn.execute("CREATE INDEX items_path ON items(path)")
        self.conn.commit()
        self._columns = None

    def copy_from(self, other: "MetadataStore") -> None:
        """This (new, writable) file becomes a consistent copy of `other` (SQLite's online backup)."""
        source = sqlite3.connect(f"{other.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            source.backup(self.conn)
        finally:
            source.close()
        self._columns = None

    def add_columns(self, names: Iterable[str]) -> None:
        """Adds the columns among `names` that the table lacks; ValueError for an unusable name."""
        for name in names:
            if name not in self.columns:
                self.conn.execute(f'ALTER TABLE items ADD COLUMN "{check_column_name(name)}"')
        self._columns = None

    def insert(self, rows: Iterable[dict[str, Any]]) -> None:
        """Inserts or replaces items given as dicts with `id`, `key`, `path`, `caption` and extra columns."""
        rows = list(rows)
        if not rows:
            return
        self.add_columns(sorted({k for row in rows for k in row} - set(BASE_COLUMNS)))
        columns = self.columns
        placeholders = ", ".join("?" for _ in columns)
        names = ", ".join(f'"{c}"' for c in columns)
        values = [tuple(_sql_value(row.get(c)) for c in columns) for row in rows]
        self.conn.executemany(f"INSERT OR REPLACE INTO items ({names}) VALUES ({placeholders})", values)

    def delete(self, ids: Iterable[int]) -> None:
        """Deletes the rows of `ids` (unknown ids are ignored); takes effect for others at `commit`."""
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            self.conn.execute(f"DELETE FROM items WHERE id IN ({', '.join('?' * len(batch))})", batch)

    def commit(self) -> None:
        """Commits the pending writes."""
        self.conn.commit()

    # ---- reading --------------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        """The table's column names, base columns first."""
        if self._columns is None:
            self._columns = [row[1] for row in self._query("PRAGMA table_info(items)")]
        return self._columns

    def count(self) -> int:
        """Number of items."""
        return self._query("SELECT COUNT(*) FROM items")[0][0]

    def get(self, item_id: int) -> Item | None:
        """The item with id `item_id`, or None."""
        items = self.get_many([item_id])
        return items[0]

    def get_many(self, ids: Sequence[int]) -> list[Item | None]:
        """Items in the order of `ids` (None for ids that are not in the index, e.g. FAISS's -1)."""
        found: dict[int, Item] = {}
        wanted = sorted({int(i) for i in ids if int(i) >= 0})
        columns = self.columns
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            query = f"SELECT * FROM items WHERE id IN ({', '.join('?' * len(batch))})"
            for row in self._query(query, batch):
                found[row[0]] = _item(columns, row)
        return [found.get(int(i)) for i in ids]

    def ids_for_path(self, path: str) -> list[int]:
        """Ids of the items whose image is `path` (one in an image index, one per caption in a caption index)."""
        return [int(r[0]) for r in self._query("SELECT id FROM items WHERE path = ? ORDER BY id", (str(path),))]

    def ids_for_keys(self, keys: Sequence[str]) -> dict[str, int]:
        """key -> id for the keys that are in the index."""
        out: dict[str, int] = {}
        keys = list(keys)
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            query = f"SELECT key, id FROM items WHERE key IN ({', '.join('?' * len(batch))})"
            out.update({k: int(i) for k, i in self._query(query, batch)})
        return out

    def all_ids(self) -> np.ndarray:
        """Every item id, ascending, as an (n,) int64 array."""
        return np.asarray([r[0] for r in self._query("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    def ids_where(self, where: str) -> np.ndarray:
        """Ids of the items matching the SQL boolean expression `where` (read-only; see module docstring)."""
        if not where or not where.strip():
            raise ValueError("the filter is empty; give an SQL condition such as \"label = 'cat'\"")
        if ";" in where:
            raise ValueError(f"the filter {where!r} contains ';': give one SQL condition, not statements")
        columns = self.columns  # read before the authorizer, which denies PRAGMA
        with self._lock:
            conn = self.conn
            conn.set_authorizer(_read_only)
            try:
                rows = conn.execute(f"SELECT id FROM items WHERE ({where}) ORDER BY id").fetchall()
            except sqlite3.Error as err:
                raise ValueError(
                    f"bad filter {where!r}: {err}. Filters are SQL conditions over the columns "
                    f"{', '.join(columns)}, e.g. \"label = 'cat'\" or \"folder LIKE 'animals/%'\""
                ) from err
            finally:
                conn.set_authorizer(None)
        return np.asarray([r[0] for r in rows], dtype=np.int64)


def _read_only(action: int, *args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def _item(columns: list[str], row: tuple) -> Item:
    values = dict(zip(columns, row))
    extra = {k: v for k, v in values.items() if k not in BASE_COLUMNS}
    return Item(int(values["id"]), values["key"], values["path"], values["caption"], extra)


def _sql_value(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bytes)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
