"""clip-retrieval's embedding layout, read and written one shard at a time.

    DIR/img_emb/img_emb_{i}.npy         (n_i, d) float16 or float32 image embeddings, L2-normalised
    DIR/text_emb/text_emb_{i}.npy       (n_i, d) the captions' embeddings, row for row
    DIR/metadata/metadata_{i}.parquet   n_i rows: image_path, caption, and whatever else the reader had
                                        (url, key, width, ...)

This is what `clip-retrieval inference` writes and what `clip-retrieval index` (autofaiss) and
`clip-retrieval back` read: shard i of every folder holds the same items in the same order, and an
item's id is its position when the shards are taken in number order. Recent versions zero-pad the
numbers to the width of the shard count (``img_emb_007.npy``), older ones do not: both are read. An
``id`` column in the metadata (which `export_index` writes) gives the ids instead, so that an index
exported after removals imports back under the same ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vlm.data.embedding_shards import npy_shape, numbered_shards
from vlm.files import atomic_directory

from .index_directory import IndexDirectory
from .metadata import BASE_COLUMNS, METADATA_FILE, MetadataStore
from .sources import _column_name, _scalar
from .vectors import CHUNK, VectorStore

__all__ = [
    "EMBEDDING_FOLDERS",
    "EmbeddingsLayout",
    "ExportReport",
    "Shard",
    "export_index",
    "metadata_rows",
    "open_layout",
    "read_vectors",
    "sample_rows",
    "unit_rows",
]

logger = logging.getLogger(__name__)

EMBEDDING_FOLDERS = {"image": "img_emb", "text": "text_emb"}  # modality -> folder (and file prefix)
METADATA_FOLDER = "metadata"
# (our metadata column, clip-retrieval's column): the one table both directions read. Other columns keep
# their names, made SQL-safe on the way in (clip-retrieval's webdataset ``key`` becomes ``key_``).
COLUMNS = (("path", "image_path"), ("caption", "caption"), ("id", "id"))
# A row whose norm is this close to 1 is kept bit for bit, so export -> import is exact; float16 shards
# (norms off by ~1e-4) and unnormalised vectors are normalised in float32.
_UNIT_TOLERANCE = 1e-5
_LAYOUT_HELP = (
    "clip-retrieval inference writes img_emb/img_emb_{i}.npy, text_emb/text_emb_{i}.npy and "
    "metadata/metadata_{i}.parquet, shard i of each describing the same rows"
)


@dataclass(frozen=True)
class Shard:
    """Shard `number`: the npy file of the indexed modality, its metadata, and the other modality's npy."""

    number: int
    vectors: Path
    metadata: Path
    rows: int
    other: Path | None = None  # text_emb when indexing images (and the reverse), when present


@dataclass(frozen=True)
class EmbeddingsLayout:
    """A checked clip-retrieval output folder: every shard's files exist, agree on rows, share one dim."""

    directory: Path
    modality: str
    dim: int
    shards: tuple[Shard, ...]
    has_ids: bool  # the metadata carries an ``id`` column (an export of a vlm index)

    @property
    def count(self) -> int:
        """Rows over all shards."""
        return sum(s.rows for s in self.shards)

    def digest(self) -> str:
        """A hash of every file's name, size and mtime: identifies this import (a rerun does nothing)."""
        h = hashlib.sha256(self.modality.encode())
        for shard in self.shards:
            for path in (shard.vectors, shard.metadata, shard.other):
                if path is not None:
                    stat = path.stat()
                    h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
        return h.hexdigest()[:16]


# ---- reading -------------------------------------------------------------------------------------
def open_layout(directory: str | Path, modality: str = "image") -> EmbeddingsLayout:
    """Checks the layout in `directory` from file headers only (no vectors are read); ValueError naming
    the file and the fix for a missing folder, a stray file, a shard without its metadata, row counts that
    disagree, or dimensions that differ."""
    directory = Path(directory)
    if modality not in EMBEDDING_FOLDERS:
        raise ValueError(f"modality must be one of {tuple(EMBEDDING_FOLDERS)}, got {modality!r}")
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a folder; give clip-retrieval inference's output folder ({_LAYOUT_HELP})")
    name = EMBEDDING_FOLDERS[modality]
    other_name = next(n for m, n in EMBEDDING_FOLDERS.items() if m != modality)
    if not (directory / name).is_dir():
        other_modality = "text" if modality == "image" else "image"
        hint = f"; it has {other_name}/: pass --modality {other_modality}" if (directory / other_name).is_dir() else ""
        raise ValueError(f"{directory} has no {name}/ folder{hint} ({_LAYOUT_HELP})")
    if not (directory / METADATA_FOLDER).is_dir():
        raise ValueError(f"{directory} has no {METADATA_FOLDER}/ folder, which names the items ({_LAYOUT_HELP})")
    vectors = numbered_shards(directory / name, name, "npy")
    metadata = numbered_shards(directory / METADATA_FOLDER, "metadata", "parquet")
    others = numbered_shards(directory / other_name, other_name, "npy") if (directory / other_name).is_dir() else {}
    if not vectors:
        raise ValueError(f"{directory / name} holds no {name}_{{i}}.npy shards ({_LAYOUT_HELP})")
    for number in sorted(set(vectors) ^ set(metadata)):
        have, lack = (vectors, metadata) if number in vectors else (metadata, vectors)
        missing = (directory / METADATA_FOLDER / f"metadata_{number}.parquet") if lack is metadata else (
            directory / name / f"{name}_{number}.npy"
        )
        raise ValueError(f"{have[number]} has no counterpart {missing}; add it, or remove {have[number]}")
    shards, dim, first = [], None, None
    for number in sorted(vectors):
        rows, d = npy_shape(vectors[number])
        if dim is None:
            dim, first = d, vectors[number]
        elif d != dim:
            raise ValueError(
                f"{vectors[number]} holds {d}-dimensional vectors but {first} holds {dim}-dimensional ones: "
                "the shards come from different models; import the shards of one model at a time"
            )
        _same_rows(vectors[number], rows, metadata[number], _parquet_rows(metadata[number]))
        other = others.get(number)
        if other is not None:
            other_rows, other_dim = npy_shape(other)
            _same_rows(vectors[number], rows, other, other_rows)
            if other_dim != dim:
                raise ValueError(
                    f"{other} holds {other_dim}-dimensional vectors but {vectors[number]} holds {dim}: the two "
                    "modalities come from different models; remove the other folder"
                )
        shards.append(Shard(number, vectors[number], metadata[number], rows, other))
    return EmbeddingsLayout(directory, modality, int(dim), tuple(shards), _has_ids(shards))


def read_vectors(shard: Shard, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The shard's vectors as float32 (`chunk` rows at a time from a memory map), L2-normalised;
    ValueError naming the file and row of a vector that is not finite or is zero."""
    xb = np.load(shard.vectors, mmap_mode="r")
    for start in range(0, len(xb), chunk):
        yield unit_rows(np.array(xb[start : start + chunk], dtype=np.float32), shard.vectors, start)


def unit_rows(x: np.ndarray, path: Path, start: int = 0) -> np.ndarray:
    """`x` (float32, modified in place) with every row of unit norm (see _UNIT_TOLERANCE); ValueError
    naming `path` and the row when one is not finite or zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no (n, d) temporary, unlike np.linalg.norm
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        row = int(np.argmax(bad))
        what = "zero" if norms[row] == 0 else "not finite (NaN or inf)"
        raise ValueError(
            f"{path} row {start + row} is {what}: it cannot be searched by cosine; remove that row from the shard "
            "and from its metadata row, or embed the item again"
        )
    off = np.abs(norms - 1) > _UNIT_TOLERANCE
    np.divide(x, norms[:, None], out=x, where=off[:, None])  # in place: no second copy of the chunk
    return x


def metadata_rows(shard: Shard, batch_size: int = 10_000) -> Iterator[list[dict[str, Any]]]:
    """The shard's metadata in batches of rows: dicts of our column names (path, caption, id when present,
    and the other columns SQL-safe)."""
    import pyarrow.parquet as pq

    theirs = {their: ours for ours, their in COLUMNS}
    for batch in pq.ParquetFile(shard.metadata).iter_batches(batch_size=batch_size):
        columns = {
            theirs.get(c, _column_name(c)): (values if c in theirs else [_scalar(v) for v in values])
            for c, values in batch.to_pydict().items()
            if not c.startswith("__index_level_")  # pandas' saved index, not data
        }
        yield [dict(zip(columns, values)) for values in zip(*columns.values())]


def sample_rows(files: Sequence[tuple[Path, int]], count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` random rows of the npy `files` (each given with its row count), read in order,
    normalised; rows that are not finite or zero are left out (these are only tuning queries)."""
    total = sum(rows for _, rows in files)
    picks = np.sort(np.random.default_rng(seed).choice(total, min(count, total), replace=False))
    out, offset = [], 0
    for path, rows in files:
        local = picks[(picks >= offset) & (picks < offset + rows)] - offset
        if len(local):
            out.append(np.array(np.load(path, mmap_mode="r")[local], dtype=np.float32))
        offset += rows
    x = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    norms = np.linalg.norm(x, axis=1)
    keep = np.isfinite(norms) & (norms > 0)
    return np.ascontiguousarray(x[keep] / norms[keep, None])


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow raises its own types (ArrowInvalid, OSError) for a damaged file
        raise ValueError(f"{path} is not a readable parquet file ({err}); write it again") from err


def _same_rows(a: Path, a_rows: int, b: Path, b_rows: int) -> None:
    if a_rows != b_rows:
        raise ValueError(
            f"{a} holds {a_rows} rows but {b} holds {b_rows}: shard files of one number must describe the same "
            "items row for row; write the shard again, or remove its files from every folder"
        )


def _has_ids(shards: Sequence[Shard]) -> bool:
    """Whether the metadata gives ids (an ``id`` column in every file); ValueError when only some do."""
    import pyarrow.parquet as pq

    with_ids = [s for s in shards if "id" in pq.read_schema(s.metadata).names]
    if with_ids and len(with_ids) != len(shards):
        without = next(s for s in shards if s not in with_ids)
        raise ValueError(
            f"{with_ids[0].metadata} has an id column but {without.metadata} has none: give every shard ids, or none"
        )
    return bool(with_ids)


# ---- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportReport:
    """What `export_index` wrote."""

    directory: Path
    count: int
    shards: int
    modality: str

    def summary(self) -> str:
        """One line for the user."""
        folder = EMBEDDING_FOLDERS[self.modality]
        return (
            f"exported {self.count} {self.modality} vectors to {self.directory} "
            f"({self.shards} shards of {folder}/ and {METADATA_FOLDER}/)"
        )


def export_index(
    directory: str | Path,
    out: str | Path,
    *,
    shard_size: int = 1_000_000,
    dtype: str = "float32",
    overwrite: bool = False,
) -> ExportReport:
    """Writes the current version of the index in `directory` to `out` in clip-retrieval's layout (see the
    module docstring), `shard_size` rows per shard, vectors as `dtype` (float32 round-trips exactly;
    float16 is what clip-retrieval writes), metadata with an ``id`` column. `out` appears whole or not at all."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; pass --overwrite to replace it, or choose another")
    store_dir = IndexDirectory(directory)
    manifest = store_dir.read_manifest()
    store_dir.verify(manifest)
    vdir = store_dir.version_path(manifest)
    store = VectorStore.open(vdir)
    meta = MetadataStore(vdir / METADATA_FILE)
    folder = EMBEDDING_FOLDERS[manifest.modality]
    shards = max(1, math.ceil(len(store) / shard_size))
    width = int(math.log10(shards)) + 1  # clip-retrieval's padding: the digits of the shard count
    try:
        with atomic_directory(out) as tmp:
            for sub in (folder, METADATA_FOLDER):
                (tmp / sub).mkdir()
            for number in range(shards):
                rows = slice(number * shard_size, min((number + 1) * shard_size, len(store)))
                name = str(number).zfill(width)
                _write_npy(tmp / folder / f"{folder}_{name}.npy", store, rows, dtype)
                _write_parquet(tmp / METADATA_FOLDER / f"metadata_{name}.parquet", meta, store.ids[rows])
    finally:
        meta.close()
    logger.info("exported %d vectors of %s to %s", len(store), directory, out)
    return ExportReport(out, len(store), shards, manifest.modality)


def _write_npy(path: Path, store: VectorStore, rows: slice, dtype: str) -> None:
    """Rows `rows` of `store` into the npy `path`, streamed through a memory map `CHUNK` rows at a time."""
    n = rows.stop - rows.start
    xb = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, store.dim))
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        xb[start:stop] = store.xb[rows.start + start : rows.start + stop]
    xb.flush()
    del xb


def _write_parquet(path: Path, meta: MetadataStore, ids: np.ndarray, batch: int = 10_000) -> None:
    """The metadata of `ids` into the parquet `path`: one shard's rows in memory, columns named as
    clip-retrieval names them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ours = dict(COLUMNS)
    columns: dict[str, list] = {ours.get(c, _their_column(c)): [] for c in meta.columns if c != "key"}
    for start in range(0, len(ids), batch):
        for item in meta.get_many(ids[start : start + batch].tolist()):
            assert item is not None, "every stored vector has a metadata row"
            values = {"id": item.id, "path": item.path, "caption": item.caption, **item.extra}
            for column, value in values.items():
                columns[ours.get(column, _their_column(column))].append(value)
    pq.write_table(pa.table({name: _arrow(values) for name, values in columns.items()}), path)


def _their_column(ours: str) -> str:
    """The inverse of sources' SQL-safe renaming of reserved names (``key_`` -> ``key``), except where the
    name is one of COLUMNS' (an ``id_`` column stays ``id_``: ``id`` holds the ids)."""
    theirs = ours[:-1]
    taken = {their for _, their in COLUMNS}
    return theirs if ours.endswith("_") and theirs in BASE_COLUMNS and theirs not in taken else ours


def _arrow(values: list) -> Any:
    """An arrow array of `values`; a column whose rows mix types (SQLite allows it) as strings."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values])
