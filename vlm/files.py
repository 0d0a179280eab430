"""Durable file writes, the one place every writer goes through (model and classifier files, configs,
the default-model record, trainer state, index manifests, results).

A file is written aside under a hidden temporary name in the same folder, flushed to disk (fsync),
renamed onto its final name, and the folder is flushed too, so the rename survives a power loss.
Readers see the old file or the new one, never a part of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_directory", "atomic_path", "atomic_write_text", "fsync_file", "fsync_dir", "fsync_tree"]


class atomic_path:
    """A temporary path next to `final`, renamed onto it (after fsync) when the block succeeds and removed
    when it raises::

        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final)
        fd, name = tempfile.mkstemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent)
        os.close(fd)
        self.tmp = Path(name)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        fsync_file(self.tmp)
        # mkstemp makes the file 0600; give it the permissions an ordinary open() would have.
        os.chmod(self.tmp, 0o666 & ~_umask())
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)


class atomic_directory:
    """A fresh hidden directory next to `final`, put in its place (after fsync) when the block succeeds and
    removed when it raises, so `final` holds the old contents or the complete new ones, never a part::

        with atomic_directory(out) as tmp:
            write_everything(tmp)

    An existing `final` is replaced as a whole (moved aside, then deleted once the new one is in place).
    """

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        fsync_tree(self.tmp)  # the rename must not reach the disk before the files
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        old = None
        if self.final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".old", dir=self.final.parent))
            os.replace(self.final, old / self.final.name)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(final: str | os.PathLike, text: str) -> Path:
    """Replaces `final` with `text` (UTF-8) atomically and durably; returns its path."""
    final = Path(final)
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes `path`'s contents to disk (not its directory entry: see `fsync_dir`)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes the directory `path` to disk, so renames and new files in it survive a power loss; a no-op
    where directories cannot be opened (Windows, which has no such flush)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes every file under the directory `path`, then the directories: a folder renamed into place
    (a checkpoint) must not reach the disk before its contents."""
    path = Path(path)
    for item in sorted(path.rglob("*"), reverse=True):  # children before their folders
        if item.is_file():
            fsync_file(item)
        elif item.is_dir():
            fsync_dir(item)
    fsync_dir(path)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it would
    give files other threads create meanwhile the wrong permissions)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
