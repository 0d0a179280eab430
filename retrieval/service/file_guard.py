"""The files the service may serve (see `retrieval.service`): the guard that opens them, their bytes in
chunks, and their thumbnails."""

from __future__ import annotations

import collections
import io
import logging
import os
import threading
from typing import Iterator, Sequence

from vlm.images import ImageLoadError, load_image

from ..metadata import Item, file_identity
from ..search import SearchIndex
from ..sources import is_inside, is_inside_folder

__all__ = ["IMAGE_TYPES", "FileGuard", "ThumbnailCache", "file_chunks"]

logger = logging.getLogger(__name__)

IMAGE_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jfif": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
    ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap", ".pbm": "image/x-portable-bitmap",
}


class FileGuard:
    """Opens the files the service may serve (see `retrieval.service`), and names them for responses."""

    def __init__(self, index: SearchIndex, roots: Sequence[str] | None) -> None:
        self.index = index
        recorded = index.manifest.roots
        if roots is None and recorded is None:
            logger.warning(
                "%s records no root folders (it was built by an older vlm): no image files will be served; "
                "start the service with --root FOLDER, or rebuild the index",
                index.store.path,
            )
        self.roots = [os.path.realpath(r) for r in (roots if roots is not None else recorded or [])]

    def open(self, item: Item) -> tuple[io.BufferedReader, os.stat_result] | None:
        """The open file of `item` and its stat, or None when it may not be served (logged)."""
        real = os.path.realpath(item.path) if item.path else ""
        if not real or not is_inside(real, self.roots):
            logger.warning("refused to serve item %d: %s is outside the roots %s", item.id, real, self.roots)
            return None
        try:  # O_NOFOLLOW: a link put in the file's place after the check above is not followed
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        file = os.fdopen(fd, "rb")
        stat = os.fstat(fd)
        identity = file_identity(None, stat)
        recorded = self.index.meta.indexed_identity(item.id)
        if identity is None or (recorded is not None and identity != recorded):
            file.close()
            logger.warning("refused to serve item %d: %s is not the file that was indexed", item.id, real)
            return None
        return file, stat

    def public_path(self, path: str | None) -> str | None:
        """`path` relative to the root it lies in (roots are not disclosed); other paths by their name.
        String operations only: indexed paths are real paths, and this runs for every hit of every search."""
        if not path or not os.path.isabs(path):
            return path
        for root in self.roots:
            if is_inside_folder(path, root):
                return path[len(root) :].lstrip(os.sep) or os.path.basename(path)
        return os.path.basename(path)


class ThumbnailCache:
    """JPEG thumbnails of served files, keyed by file identity (a changed file gets a new one)."""

    def __init__(self, size: int, capacity: int = 4096) -> None:
        self.size, self.capacity = size, capacity
        self._cache: collections.OrderedDict[str, bytes | None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: io.BufferedReader, stat: os.stat_result) -> bytes | None:
        """The thumbnail of the open `file`, or None when it cannot be decoded."""
        key = file_identity(None, stat) or ""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._make(file.read())
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data

    def _make(self, encoded: bytes) -> bytes | None:
        try:
            image = load_image(encoded, draft_size=(self.size, self.size))
        except ImageLoadError:
            return None
        image.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()


def file_chunks(file: io.BufferedReader, size: int = 1 << 16) -> Iterator[bytes]:
    """The bytes of the open `file` in blocks of `size`, closing it at the end (a streamed response's body)."""
    with file:
        while chunk := file.read(size):
            yield chunk

