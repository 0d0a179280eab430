"""The full vectors of an index on disk, memory-mapped: `vectors.npy` (n, d) float32 in ascending id order
and `ids.npy` (n,) int64.

They give exact ground truth for tuning, exact re-ranking of compressed codes, exact search of small
filtered subsets, and the input to rebuild an index of another kind, without holding anything in RAM.
"""

from __future__ import annotations

import mmap as mmap_module
from mmap import PAGESIZE
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from vlm.files import fsync_file

from .index_directory import IndexCorruptError

__all__ = ["VectorStore", "write_vectors", "merge_sorted", "count_after", "VECTORS_FILE", "IDS_FILE"]

VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
CHUNK = 65536  # rows per step when streaming: 128 MiB at d=512


@dataclass
class VectorStore:
    """Vectors xb (n, d) float32 and their ids (n,) int64, ascending; memory-mapped when opened from disk."""

    ids: np.ndarray  # (n,) int64, strictly increasing
    xb: np.ndarray  # (n, d) float32, row i belongs to ids[i]

    @classmethod
    def open(cls, directory: str | Path, *, mmap: bool = True) -> "VectorStore":
        """The store in `directory` (memory-mapped unless `mmap=False`); IndexCorruptError (a ValueError)
        naming the file and telling to rebuild the index when a file is unreadable or they do not match."""
        directory = Path(directory)
        ids = _load(directory / IDS_FILE, mmap)
        xb = _load(directory / VECTORS_FILE, mmap)
        if ids.ndim != 1 or xb.ndim != 2 or len(ids) != len(xb) or ids.dtype != np.int64 or xb.dtype != np.float32:
            raise IndexCorruptError(
                f"{directory / VECTORS_FILE} and {directory / IDS_FILE} do not match "
                f"({xb.shape} {xb.dtype} vs {ids.shape} {ids.dtype}); rebuild the index with `vlm index build`"
            )
        return cls(ids, xb)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Dimension d of the vectors."""
        return self.xb.shape[1]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (-1 where the id is not stored)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(self.ids)
        if n and int(self.ids[-1]) - int(self.ids[0]) == n - 1:  # ids without gaps (no removals): arithmetic,
            rows = ids - self.ids[0]  # where a binary search per id took 40% of re-ranking 1,280 candidates
            return np.where((rows >= 0) & (rows < n), rows, -1)
        rows = np.searchsorted(self.ids, ids)
        rows = np.minimum(rows, max(len(self.ids) - 1, 0))
        found = (len(self.ids) > 0) & (self.ids[rows] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        return np.where(found, rows, -1)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), d) vectors; every id must be stored."""
        rows = self.rows(ids)
        if (rows < 0).any():
            raise KeyError(f"ids not in the vector store: {np.asarray(ids)[rows < 0][:10].tolist()}")
        order = np.argsort(rows)  # sorted reads are sequential on disk
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        out[order] = self.xb[rows[order]]
        return out

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, xb) in ascending id order, `size` rows at a time: views of the memory-mapped files (copies
        otherwise), whose pages leave this process's resident set once the next chunk is asked for."""
        for start in range(0, len(self.ids), size):
            yield np.asarray(self.ids[start : start + size]), np.ascontiguousarray(self.xb[start : start + size])
            _drop_pages(self.xb, start, start + size)
            _drop_pages(self.ids, start, start + size)

    def sample(self, count: int, seed: int = 0) -> np.ndarray:
        """`count` random rows (all of them, uncopied, if fewer), read in order, CHUNK rows at a time so
        that the pages read leave the resident set as they go (see `chunks`)."""
        if count >= len(self.ids):
            return np.ascontiguousarray(self.xb)
        rows = np.sort(np.random.default_rng(seed).choice(len(self.ids), count, replace=False))
        out = np.empty((count, self.dim), dtype=np.float32)
        for start in range(0, count, CHUNK):
            part = rows[start : start + CHUNK]
            out[start : start + len(part)] = self.xb[part]
            _drop_pages(self.xb, int(part[0]), int(part[-1]) + 1)
        return out


def _drop_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Unmaps rows [start, stop) of a memory-mapped `array` from this process (they stay in the page
    cache): a pass over a store larger than RAM then keeps only about one chunk resident, instead of
    every page it touched until the kernel evicts them. Nothing for arrays in RAM."""
    mapping = getattr(array, "_mmap", None)
    advice = getattr(mmap_module, "MADV_DONTNEED", None)
    if mapping is None or advice is None or stop <= start:
        return
    row = array.strides[0]
    base = np.frombuffer(mapping, np.uint8).ctypes.data
    first = array.ctypes.data - base + start * row
    last = array.ctypes.data - base + min(stop, len(array)) * row
    first -= first % PAGESIZE  # madvise wants page-aligned starts; a shared page just faults back in
    if last > first:
        mapping.madvise(advice, first, last - first)


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as err:
        raise IndexCorruptError(f"cannot read {path} ({err}); rebuild the index with `vlm index build`") from err


def write_vectors(
    directory: str | Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], count: int, dim: int
) -> VectorStore:
    """Streams (ids, xb) chunks in ascending id order into `directory`; returns the memory-mapped store."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    xb_out = np.lib.format.open_memmap(directory / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(count, dim))
    ids_out = np.lib.format.open_memmap(directory / IDS_FILE, mode="w+", dtype=np.int64, shape=(count,))
    filled, last = 0, -1
    for ids, xb in chunks:
        m = len(ids)
        if m == 0:
            continue
        if filled + m > count or ids[0] <= last or (m > 1 and (np.diff(ids) <= 0).any()):
            raise AssertionError("vector chunks must come in strictly increasing id order and add up to `count`")
        ids_out[filled : filled + m] = ids
        xb_out[filled : filled + m] = xb
        filled, last = filled + m, int(ids[-1])
    if filled != count:
        raise AssertionError(f"expected {count} vectors, got {filled}")
    for array in (xb_out, ids_out):
        array.flush()
    del xb_out, ids_out
    for name in (VECTORS_FILE, IDS_FILE):
        fsync_file(directory / name)
    return VectorStore.open(directory)


def merge_sorted(
    store: VectorStore, remove: np.ndarray, add_ids: np.ndarray, add_xb: np.ndarray, size: int = CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The store's rows minus `remove`, plus (add_ids, add_xb) (replacing rows with the same id), in id order."""
    order = np.argsort(add_ids, kind="stable")
    add_ids, add_xb = np.asarray(add_ids, np.int64)[order], np.asarray(add_xb, np.float32)[order]
    drop = np.union1d(np.asarray(remove, np.int64), add_ids)
    pos = 0  # next row of the additions to emit
    for ids, xb in store.chunks(size):
        keep = ~np.isin(ids, drop)
        upto = np.searchsorted(add_ids, ids[-1], side="right") if len(ids) else pos
        merged_ids = np.concatenate([ids[keep], add_ids[pos:upto]])
        merged_xb = np.concatenate([xb[keep], add_xb[pos:upto]])
        perm = np.argsort(merged_ids, kind="stable")
        pos = upto
        yield merged_ids[perm], merged_xb[perm]
    if pos < len(add_ids):
        yield add_ids[pos:], add_xb[pos:]


def count_after(store: VectorStore, remove: np.ndarray, add_ids: np.ndarray) -> int:
    """How many vectors `store` holds after removing `remove` and adding (or replacing) `add_ids`."""
    drop = np.union1d(np.asarray(remove, np.int64), np.asarray(add_ids, np.int64))
    stored_dropped = int((store.rows(drop) >= 0).sum()) if len(drop) else 0
    return len(store) - stored_dropped + len(np.unique(add_ids))
