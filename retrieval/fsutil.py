"""File helpers of the retrieval package: durable writes (from `vlm.files`), content digests, and a quiet stdout."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

# The core's durable writes, re-exported under the names this package's modules import.
from vlm.files import atomic_path, atomic_write_text, fsync_dir, fsync_file

__all__ = ["atomic_path", "atomic_write_text", "fsync_file", "fsync_dir", "file_digest", "quiet_stdout"]


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
