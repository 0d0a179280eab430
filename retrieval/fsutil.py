"""Durable file writes: write aside, fsync, rename, fsync the directory (so the rename survives power loss)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

# The core's write-aside, fsync, rename, fsync-the-directory context manager, re-exported here.
from vlm.checkpoint import atomic_path

__all__ = ["atomic_path", "atomic_write_text", "fsync_file", "fsync_dir", "file_digest", "quiet_stdout"]


def atomic_write_text(final: str | Path, text: str) -> None:
    """Replaces `final` with `text` atomically and durably: readers see the old file or the new one, never a part."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def fsync_file(path: str | Path) -> None:
    """Flushes `path`'s contents to disk (not its directory entry: see `fsync_dir`)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flushes the directory `path` to disk, so renames and new files in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silences C-level writes to stdout: FAISS's on-disk inverted lists printf a line on every load and
    merge, which would corrupt the output of `vlm search --json`."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
