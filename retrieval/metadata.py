"""Item metadata in SQLite: id -> path, caption and any extra columns (folder, label, ...).

One table, ``items(id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, path TEXT, caption TEXT, <extra>)``:
`key` is the item's identity across updates (the image path; path + caption in a caption index).
Filters (``label = 'cat'``, ``folder LIKE 'animals/%'``) are the small language of `retrieval.filters`,
never SQL: a filter is parsed and compiled to ``SELECT id FROM items WHERE <condition>`` with quoted
columns and parameters. The query runs with an authorizer that allows reading `items` and calling LIKE,
nothing else (defence in depth), and under a time limit (`time_limit`, FILTER_TIME_LIMIT seconds by
default): a filter that runs longer raises FilterError instead of holding a thread. The rows a filter
can return are bounded by the table: the language has no joins or subqueries.

A read-only store opens `connections` SQLite connections at first use and lends one to each query, so
a slow filter in one thread does not hold up lookups in others; filters may hold all but one of them,
which stays free for lookups. Opening them up front also keeps the file readable after an update has
removed the version it belongs to: open connections keep reading it, a new one could not open it.
`close()` interrupts running queries rather than waiting for them. A writable store has one connection.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .filters import FilterError, compile_filter

__all__ = ["Item", "MetadataStore", "METADATA_FILE", "FILTER_TIME_LIMIT", "check_column_name"]

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.sqlite"
BASE_COLUMNS = ("id", "key", "path", "caption")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
FILTER_TIME_LIMIT = 2.0  # seconds a filter may run: a scan of millions of rows, not a stalled service
READ_CONNECTIONS = 4
# SQLite VM steps between deadline checks: well under a millisecond of work, so the limit holds to about
# a millisecond while the Python call stays a negligible cost.
_PROGRESS_STEPS = 10_000
# The identity of each item's file when it was indexed, so a service can refuse a file replaced since.
_FILES_TABLE = "CREATE TABLE files (id INTEGER PRIMARY KEY, identity TEXT NOT NULL)"
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


class _Connections:
    """A store's SQLite connections, all opened at once, each lent to one query at a time (see the module
    docstring); filters may hold all but one."""

    def __init__(self, connections: list[sqlite3.Connection]) -> None:
        self.all = connections
        self.closed = False
        self._idle = list(connections)
        self._filters = 0
        self._filter_slots = max(1, len(connections) - 1)
        self._changed = threading.Condition()

    @contextmanager
    def lend(self, deadline: float | None = None, *, for_filter: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection whose statements stop with OperationalError('interrupted') past `deadline` (a
        `time.monotonic()` value); TimeoutError when none is free for it by then."""
        conn = self._take(deadline, for_filter)
        stop = lambda: self.closed or (deadline is not None and time.monotonic() > deadline)  # noqa: E731
        conn.set_progress_handler(stop, _PROGRESS_STEPS)
        try:
            yield conn
        except sqlite3.OperationalError as err:
            if self.closed and str(err) == "interrupted":
                raise sqlite3.ProgrammingError("the metadata store was closed while this query ran") from err
            raise
        finally:
            with self._changed:
                self._filters -= for_filter
                if self.closed:
                    conn.close()
                else:
                    self._idle.append(conn)
                self._changed.notify_all()

    def _take(self, deadline: float | None, for_filter: bool) -> sqlite3.Connection:
        def ready() -> bool:
            return self.closed or (bool(self._idle) and (not for_filter or self._filters < self._filter_slots))

        with self._changed:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._changed.wait_for(ready, wait):
                raise TimeoutError(f"{self._filters} other filters were running")
            if self.closed:
                raise sqlite3.ProgrammingError("the metadata store was closed")
            self._filters += for_filter
            return self._idle.pop()

    def close(self) -> None:
        """Closes the idle connections and interrupts the lent ones, which close when given back."""
        with self._changed:
            self.closed = True
            for conn in self.all:
                if conn in self._idle:
                    conn.close()
                else:
                    conn.interrupt()
            self._idle.clear()
            self._changed.notify_all()


class MetadataStore:
    """The SQLite file of an index version; writable only while an update builds that version.

    `time_limit` (seconds, None for none) bounds each filter query; `connections` is how many queries a
    read-only store runs at once (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        writable: bool = False,
        time_limit: float | None = FILTER_TIME_LIMIT,
        connections: int = READ_CONNECTIONS,
    ) -> None:
        self.path = Path(path)
        self.writable = writable
        if not writable and not self.path.is_file():
            raise ValueError(f"metadata file {self.path} is missing; rebuild the index with `vlm index build`")
        self.time_limit = time_limit
        self.read_connections = connections
        self._connections: _Connections | None = None
        self._lock = threading.Lock()
        self._columns: list[str] | None = None

    # ---- connections ----------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        """The store's first SQLite connection (all are opened on first use): the writer of a writable
        store; in a read-only one, for single-threaded use such as start-up queries. Concurrent readers go
        through the methods below, which lend each query a connection of its own."""
        return self._pool().all[0]

    def _pool(self) -> _Connections:
        with self._lock:
            if self._connections is None:
                count = 1 if self.writable else self.read_connections
                self._connections = _Connections([self._connect() for _ in range(count)])
            return self._connections

    def _connect(self) -> sqlite3.Connection:
        if self.writable:
            conn = sqlite3.connect(self.path)
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=FULL")
            return conn
        return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._pool().lend() as conn:
            return conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Closes the connections without waiting for running queries: they are interrupted and raise
        sqlite3.ProgrammingError. The next use opens new connections."""
        with self._lock:
            connections, self._connections = self._connections, None
        if connections is not None:
            connections.close()

    # ---- writing --------------------------------------------------------------------------------
    def create(self, extra_columns: Sequence[str] = ()) -> None:
        """Creates and commits the empty ``items`` table with the base columns plus `extra_columns`;
        ValueError for an unusable column name."""
        cols = "".join(f', "{check_column_name(c)}"' for c in extra_columns)
        self.conn.execute(
            f"CREATE TABLE items (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, path TEXT, caption TEXT{cols})"
        )
        self.conn.execute("CREATE INDEX items_path ON items(path)")
        self.conn.execute(_FILES_TABLE)
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
        self.conn.execute(_FILES_TABLE.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))  # older indexes
        self.conn.executemany("DELETE FROM files WHERE id = ?", [(row["id"],) for row in rows])
        identities = [(row["id"], file_identity(row.get("path"))) for row in rows]
        self.conn.executemany("INSERT INTO files VALUES (?, ?)", [pair for pair in identities if pair[1]])

    def delete(self, ids: Iterable[int]) -> None:
        """Deletes the rows of `ids` (unknown ids are ignored); takes effect for others at `commit`."""
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            self.conn.execute(f"DELETE FROM items WHERE id IN ({', '.join('?' * len(batch))})", batch)
            if self._has_files_table():
                self.conn.execute(f"DELETE FROM files WHERE id IN ({', '.join('?' * len(batch))})", batch)

    def commit(self) -> None:
        """Commits the pending writes."""
        self.conn.commit()

    # ---- reading --------------------------------------------------------------------------------
    def indexed_identity(self, item_id: int) -> str | None:
        """`file_identity` of item `item_id`'s file when it was indexed; None when not recorded (no file, or
        an index written before identities were recorded)."""
        if not self._has_files_table():
            return None
        rows = self._query("SELECT identity FROM files WHERE id = ?", (int(item_id),))
        return rows[0][0] if rows else None

    def _has_files_table(self) -> bool:
        return bool(self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'files'"))

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

    def distinct_values(self, column: str, limit: int) -> list[Any]:
        """Up to `limit` distinct non-null values of `column` (for a filter's drop-down); ValueError for a
        column the table lacks."""
        if column not in self.columns:
            raise ValueError(f"{column!r} is not a metadata column; columns are {', '.join(self.columns)}")
        rows = self._query(f'SELECT DISTINCT "{column}" FROM items WHERE "{column}" IS NOT NULL LIMIT ?', (limit,))
        return [row[0] for row in rows]

    def all_ids(self) -> np.ndarray:
        """Every item id, ascending, as an (n,) int64 array."""
        return np.asarray([r[0] for r in self._query("SELECT id FROM items ORDER BY id")], dtype=np.int64)

    def ids_where(self, where: str) -> np.ndarray:
        """Ids of the items matching the filter `where` (the language of `retrieval.filters`), ascending.
        FilterError (a ValueError) for a filter outside that language, or one running past `time_limit`."""
        condition = compile_filter(where, self.columns)  # columns read before the authorizer denies PRAGMA
        deadline = None if self.time_limit is None else time.monotonic() + self.time_limit
        try:
            with self._pool().lend(deadline, for_filter=True) as conn:
                conn.set_authorizer(_read_only)
                try:
                    rows = conn.execute(f"SELECT id FROM items WHERE {condition.sql} ORDER BY id", condition.params)
                    return np.fromiter((row[0] for row in rows), dtype=np.int64)
                finally:
                    conn.set_authorizer(None)
        except TimeoutError as err:
            raise FilterError(
                f"the filter {where!r} could not start within {self.time_limit} s: {err}; try again"
            ) from err
        except sqlite3.OperationalError as err:
            if str(err) != "interrupted":
                raise
            raise FilterError(
                f"the filter {where!r} took longer than {self.time_limit} s; make it simpler or more selective "
                f"(fewer conditions, LIKE patterns anchored at the start such as 'animals/%' rather than '%cat%')"
            ) from err


def file_identity(path: Any, stat: os.stat_result | None = None) -> str | None:
    """``device:inode:size:mtime_ns`` of the regular file `path` (or of `stat`, from an open file): what
    changes when the file is replaced or edited; None when `path` is not a regular file."""
    if stat is None:
        if not isinstance(path, str) or not path:
            return None
        try:
            stat = os.stat(path)
        except (OSError, ValueError):
            return None
    if not S_ISREG(stat.st_mode):
        return None
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_only(action: int, arg1: str | None, arg2: str | None, *rest: Any) -> int:
    """SQLite authorizer for filter queries: SELECT, reading the items table, and the LIKE function."""
    allowed = (
        action == sqlite3.SQLITE_SELECT
        or (action == sqlite3.SQLITE_READ and arg1 == "items")
        or (action == sqlite3.SQLITE_FUNCTION and arg2 == "like")
    )
    return sqlite3.SQLITE_OK if allowed else sqlite3.SQLITE_DENY


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
