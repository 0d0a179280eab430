"""An index directory on disk: versions of (index, metadata, vectors) and a manifest naming the current one.

    DIR/manifest.json        the current version, the model fingerprint, preprocessing, normalisation,
                             index kind and tuned knobs, the size and sha256 of every file of the
                             version, and a sha256 of the manifest's own fields
    DIR/v000007/             index.faiss [lists.ivfdata] metadata.sqlite vectors.npy ids.npy [queries.npy]
    DIR/.jobs/               resumable embedding jobs of builds and updates in progress
    DIR/.lock                held by the one process allowed to update

An update never touches the current version: it writes a whole new version directory next to it,
fsyncs it, then replaces ``manifest.json`` atomically (write aside, fsync, rename, fsync the directory).
A crash at any point leaves either the old manifest with its intact files, or the new one: the index,
its metadata and its vectors always change together. Unreferenced version directories are removed by
the next update. Readers that still use an old version keep their open (unlinked) files.

Opening a version checks every file's size (and the sha256 of files up to HASH_LIMIT); `verify(full=True)`,
which `vlm index info --verify` and every update run, checks every sha256 and asks SQLite to check the
metadata, so that an update never copies damage into the next version and records it as intact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlm.files import atomic_write_text, fsync_dir

from .metadata import METADATA_FILE

__all__ = ["Manifest", "IndexDirectory", "IndexCorruptError", "MANIFEST_FILE", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# 2: the manifest carries a sha256 of its own fields, and a sha256 of every file (1: files up to HASH_LIMIT).
FORMAT_VERSION = 2
# Files up to this size are checked against their sha256 on every load; larger ones (the vectors, on-disk
# lists) by size, which catches truncation without reading gigabytes. `verify(full=True)` hashes all.
HASH_LIMIT = 256 << 20
_VERSION_DIR = re.compile(r"^v\d{6}$")
_HISTORY = 50


class IndexCorruptError(ValueError):
    """An index directory whose files do not match its manifest (truncated, corrupted, missing)."""


@dataclass
class Manifest:
    """Everything that binds an index's files together; `manifest.json` holds it."""

    version: int
    model: dict[str, Any]  # fingerprint, embed_dim, source (the name or directory it was loaded from)
    preprocessing: dict[str, Any]  # the image transform and JPEG draft decoding the vectors went through
    modality: str  # what the vectors embed: "image" (answer text queries) or "text" (captions)
    spec: dict[str, Any]  # retrieval.kinds.IndexSpec
    params: dict[str, Any]  # retrieval.index.SearchParams
    count: int
    next_id: int  # ids are never reused, even after removes
    normalization: str = "l2"  # vectors and queries are L2-normalised: inner products are cosines
    metric: str = "inner_product"
    tuning: dict[str, Any] | None = None
    memory_budget: int | None = None
    # Real paths of the folders the indexed files lie in: the only ones the service serves from.
    # None in indexes written before roots were recorded.
    roots: list[str] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def directory_name(self) -> str:
        """The folder of this version, e.g. ``v000007``."""
        return f"v{self.version:06d}"

    def to_json(self) -> str:
        """The manifest as the indented, key-sorted JSON of manifest.json, with the sha256 of its fields."""
        fields = asdict(self)
        return _dumps({**fields, "checksum": _fields_digest(fields)})

    @classmethod
    def from_json(cls, text: str | bytes, source: Path) -> "Manifest":
        """The manifest in `text` (read from `source`); IndexCorruptError naming `source` when it is not a
        manifest or does not match its own checksum, ValueError when a newer vlm wrote it."""
        fix = "restore it from a backup or rebuild the index with `vlm index build --overwrite`"
        try:
            data = json.loads(text)
            checksum = data.pop("checksum", None)  # manifests of format 1 have none
        except (ValueError, AttributeError) as err:  # not JSON, not UTF-8, not an object
            raise IndexCorruptError(f"{source} is not a readable index manifest ({err}); {fix}") from err
        version = data.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ValueError(f"{source} has format {version}, newer than this vlm's {FORMAT_VERSION}; upgrade vlm")
        if checksum is not None and checksum != _fields_digest(data):
            raise IndexCorruptError(f"{source} does not match its own checksum (edited or corrupted); {fix}")
        try:
            return cls(**data)
        except TypeError as err:
            raise IndexCorruptError(f"{source} is not a readable index manifest ({err}); {fix}") from err


class IndexDirectory:
    """The files of one index directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        """``DIR/manifest.json``."""
        return self.path / MANIFEST_FILE

    def exists(self) -> bool:
        """Whether the directory holds an index (has a manifest)."""
        return self.manifest_path.is_file()

    def read_manifest(self) -> Manifest:
        """The current manifest; FileNotFoundError telling how to build an index when there is none,
        IndexCorruptError when it is unreadable."""
        if not self.exists():
            hint = (
                "it is not a directory" if self.path.exists() and not self.path.is_dir() else "it has no manifest.json"
            )
            raise FileNotFoundError(
                f"{self.path} is not a search index ({hint}); create one with `vlm index build SOURCE --out {self.path}`"
            )
        return Manifest.from_json(self.manifest_path.read_bytes(), self.manifest_path)

    def version_path(self, manifest: Manifest) -> Path:
        """The folder of the version `manifest` names, e.g. ``DIR/v000007``."""
        return self.path / manifest.directory_name

    def jobs_path(self) -> Path:
        """``DIR/.jobs``, where resumable embedding jobs keep their shards."""
        return self.path / ".jobs"

    # ---- integrity ------------------------------------------------------------------------------
    def verify(self, manifest: Manifest, *, full: bool = False) -> None:
        """IndexCorruptError naming the first damaged file unless every file of the manifest's version has
        its recorded size and sha256 (checked for files up to HASH_LIMIT; with `full` for all of them,
        and SQLite's quick_check of the metadata)."""
        directory = self.version_path(manifest)
        fix = f"restore {self.path} from a backup or rebuild it with `vlm index build --overwrite`"
        for name, record in manifest.files.items():
            path = directory / name
            if not path.is_file():
                raise IndexCorruptError(f"{path} is missing; {fix}")
            size = path.stat().st_size
            if size != record["size"]:
                raise IndexCorruptError(
                    f"{path} has {size} bytes but the manifest records {record['size']} (truncated or replaced); {fix}"
                )
            if (full or size <= HASH_LIMIT) and record.get("sha256") and _file_digest(path) != record["sha256"]:
                raise IndexCorruptError(f"{path} does not match its recorded sha256 (corrupted); {fix}")
        if full and METADATA_FILE in manifest.files:
            _check_sqlite(directory / METADATA_FILE, fix)

    # ---- updating -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """Exclusive right to update this directory, held through a lock file (released by the OS if the
        process dies)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise ValueError(
                    f"another process is updating {self.path}; wait for it to finish and run again"
                ) from err
            yield
        finally:
            os.close(fd)

    def new_version(self, version: int) -> Path:
        """An empty directory for `version` (a leftover of a crashed update is cleared first)."""
        path = self.path / f"v{version:06d}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def publish(self, manifest: Manifest, action: dict[str, Any]) -> None:
        """Records the new version's files in `manifest` and makes it current atomically."""
        directory = self.version_path(manifest)
        manifest.files = {
            p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)}
            for p in sorted(directory.iterdir())
            if p.is_file()
        }
        stamp = {
            "version": manifest.version,
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **action,
        }
        manifest.history = (manifest.history + [stamp])[-_HISTORY:]
        fsync_dir(directory)
        atomic_write_text(self.manifest_path, manifest.to_json())
        logger.info("%s: version %d is current (%d items)", self.path, manifest.version, manifest.count)
        self.remove_stale(manifest)

    def remove_stale(self, current: Manifest) -> None:
        """Deletes version directories other than the current one (only call while holding `writer`)."""
        for entry in self.path.iterdir():
            if entry.is_dir() and _VERSION_DIR.match(entry.name) and entry.name != current.directory_name:
                shutil.rmtree(entry, ignore_errors=True)


def _dumps(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


def _file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fields_digest(fields: dict) -> str:
    """sha256 of the manifest's fields as `to_json` writes them (a same-size edit of any value changes it)."""
    return hashlib.sha256(_dumps(fields).encode()).hexdigest()


def _check_sqlite(path: Path, fix: str) -> None:
    """IndexCorruptError naming `path` unless SQLite opens it and its quick_check (every page and index,
    in one pass) says ok."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            result = conn.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as err:
        raise IndexCorruptError(f"{path} is not a readable SQLite database ({err}); {fix}") from err
    if result != ("ok",):
        raise IndexCorruptError(f"{path} fails SQLite's quick_check ({result and result[0]}); {fix}")
