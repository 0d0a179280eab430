"""Building an index directory from embeddings made elsewhere: clip-retrieval's layout
(`retrieval.clip_retrieval`), imported shard by shard.

The result is an ordinary index directory, written the way `retrieval.build` writes one: the same
manifest, index kinds and memory budget, tuning against exact search, atomic publish, and a rerun with the
same files does nothing. Updates (`vlm index add/remove`) and `vlm search` work on it; text queries and
`add` need the model that made the embeddings, recorded when the user names it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from vlm.embed import embed_texts
from vlm.model import CLIP

from .build import BuildOptions, UpdateReport, build_budget, finished_build, index_vectors, replaced_manifest
from .clip_retrieval import EmbeddingsLayout, Shard, metadata_rows, open_layout, read_vectors, sample_rows
from .index import set_threads
from .index_directory import IndexDirectory, Manifest
from .metadata import METADATA_FILE, MetadataStore
from .vectors import VectorStore, write_vectors

__all__ = ["build_from_embeddings"]

logger = logging.getLogger(__name__)

# The named model must reproduce the stored caption embeddings at least this closely (cosine, median of
# the rows checked): the same model lands above 0.99 even through float16, another model near 0.
_SAME_MODEL = 0.9
_CHECKED_CAPTIONS = 16
_METADATA_BATCH = 10_000


def build_from_embeddings(
    embeddings: str | Path,
    directory: str | Path,
    *,
    model: CLIP | None = None,
    model_source: str | None = None,
    modality: str = "image",
    options: BuildOptions = BuildOptions(),
    overwrite: bool = False,
    roots: Sequence[str | Path] | None = None,
    tuning_texts: Sequence[str] | None = None,
) -> UpdateReport:
    """Indexes the clip-retrieval output in `embeddings` (its img_emb/, or text_emb/ with
    ``modality="text"``) into `directory`, ids in shard order (or the metadata's ``id`` column).

    `model` is the model that made the embeddings, when known: it is checked against them where captions
    and their embeddings allow, then recorded (with `model_source`, the name `vlm search` loads) so text
    queries work. `roots` are the folders whose files the service may serve (default: none). Tuning
    queries are `tuning_texts` (embedded by `model`), else the other modality's embeddings, else a sample
    of the indexed ones.
    """
    start = time.perf_counter()
    set_threads(options.threads)
    layout = open_layout(embeddings, modality)
    if layout.count == 0:
        raise ValueError(f"{layout.directory} holds no embeddings (every shard has 0 rows); nothing to index")
    record = _model_record(layout, model, model_source)
    store_dir = IndexDirectory(directory)
    digest = f"import-{layout.digest()}-{record['fingerprint'][:8]}"
    finished = finished_build(store_dir, digest, overwrite, directory)
    if finished is not None:
        return finished
    xq_texts = _embedded_texts(model, tuning_texts)
    with store_dir.writer():
        report = _write_import(store_dir, layout, record, options, overwrite, digest, _real_roots(roots), xq_texts)
    report.seconds = time.perf_counter() - start
    return report


def _write_import(
    store_dir: IndexDirectory,
    layout: EmbeddingsLayout,
    record: dict,
    options: BuildOptions,
    overwrite: bool,
    digest: str,
    roots: list[str],
    xq_texts: np.ndarray | None,
) -> UpdateReport:
    """Writes and publishes the version holding `layout`: vectors and metadata in one pass over the shards,
    then index, tuning and manifest as `retrieval.build` does. Runs under the writer lock."""
    old = replaced_manifest(store_dir, overwrite)
    version = old.version + 1 if old else 1
    vdir = store_dir.new_version(version)
    try:
        store = _write_vectors_and_metadata(vdir, layout, options.embed.progress)
        xq, query_source = _tuning_queries(layout, store, options, xq_texts)
        spec, vindex, tuning = index_vectors(store, xq, query_source, options, vdir)
    except BaseException:
        shutil.rmtree(vdir, ignore_errors=True)  # nothing was published; leave no half-written version
        raise
    manifest = Manifest(
        version=version,
        model=record,
        # The transform the vectors went through is clip-retrieval's, unknown here; image queries use the
        # recorded model's own transform, which is what clip-retrieval applies for open_clip models.
        preprocessing={"imported": str(layout.directory), "draft_jpeg": False},
        modality=layout.modality,
        spec=spec.to_dict(),
        params=vindex.params.to_dict(),
        count=len(store),
        next_id=int(store.ids.max()) + 1,
        tuning=tuning,
        memory_budget=build_budget(options),
        roots=roots,
        history=old.history if old else [],
    )
    action = {"action": "build", "added": len(store), "imported": str(layout.directory), "job": digest}
    store_dir.publish(manifest, action)
    return UpdateReport(
        store_dir.path, "build", version, len(store), added=len(store), spec=spec, tuning=manifest.tuning
    )


# ---- vectors and metadata ------------------------------------------------------------------------
def _write_vectors_and_metadata(vdir: Path, layout: EmbeddingsLayout, progress: bool) -> VectorStore:
    """Streams every shard (one at a time in memory) into the version's vector store and metadata."""
    from tqdm.auto import tqdm

    meta = MetadataStore(vdir / METADATA_FILE, writable=True)
    meta.create()
    with tqdm(total=layout.count, desc="import", unit="vec", disable=not progress, dynamic_ncols=True) as bar:
        store = write_vectors(vdir, _chunks(layout, meta, bar), layout.count, layout.dim)
    meta.commit()
    stored = meta.count()
    meta.close()
    if stored != len(store):  # INSERT OR REPLACE would have merged two rows under one key or id
        raise AssertionError(f"metadata holds {stored} rows for {len(store)} vectors")
    return store


def _chunks(layout: EmbeddingsLayout, meta: MetadataStore, bar) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, xb) of every shard in order; writes each shard's metadata on the way."""
    position, last = 0, -1
    for shard in layout.shards:
        ids = _shard_ids(shard, position, last) if layout.has_ids else np.arange(position, position + shard.rows)
        _insert_metadata(meta, shard, ids, layout.modality)
        start = 0
        for xb in read_vectors(shard):
            yield ids[start : start + len(xb)], xb
            start += len(xb)
            bar.update(len(xb))
        position += shard.rows
        last = int(ids[-1]) if len(ids) else last


def _shard_ids(shard: Shard, position: int, last: int) -> np.ndarray:
    """The shard's ``id`` column; ValueError naming the file unless they are integers increasing past `last`."""
    import pyarrow.parquet as pq

    column = pq.read_table(shard.metadata, columns=["id"]).column("id")
    ids = np.asarray(column.to_numpy(zero_copy_only=False))
    if column.null_count or ids.dtype.kind not in "iu" or (len(ids) and (ids[0] <= last or (np.diff(ids) <= 0).any())):
        raise ValueError(
            f"the id column of {shard.metadata} must hold integers that increase row by row and across shards "
            f"(after {last}); drop the column to number the rows by position (from {position})"
        )
    return ids.astype(np.int64)


def _insert_metadata(meta: MetadataStore, shard: Shard, ids: np.ndarray, modality: str) -> None:
    """The shard's metadata under `ids`. Keys (an item's identity for `vlm index add`) are the image path
    as in `retrieval.sources` (path and caption in a caption index); a key already taken (LAION lists
    some images twice) gets the id appended, so that every vector keeps its row."""
    start = 0
    for rows in metadata_rows(shard, _METADATA_BATCH):
        for row, item_id in zip(rows, ids[start : start + len(rows)]):
            row["id"] = int(item_id)
            row.setdefault("path", "")
            row.setdefault("caption", None)
        start += len(rows)
        keys = [_key(row, modality) for row in rows]
        taken, seen = meta.ids_for_keys(keys), set()
        for row, key in zip(rows, keys):
            row["key"] = f"{key}#{row['id']}" if key in taken or key in seen else key
            seen.add(key)
        meta.insert(rows)


def _key(row: dict, modality: str) -> str:
    path = str(row["path"] or "") or f"#{row['id']}"
    return f"{path}\n{row['caption'] or ''}" if modality == "text" else path


# ---- model and tuning queries --------------------------------------------------------------------
def _model_record(layout: EmbeddingsLayout, model: CLIP | None, source: str | None) -> dict:
    """What the manifest records about the model.

    The fingerprint says "queries must come from this model". The embeddings were made elsewhere, so no
    fingerprint of ours came with them: when the user names the model, we check what can be checked (its
    width, and that it reproduces the stored caption embeddings where there are any) and record its
    fingerprint, because it is the model that will embed the queries. Without a model the fingerprint is
    a name for these files that no model has: the index answers vector queries only, and text queries
    say to name the model (rebuild with --model).
    """
    base = {"embed_dim": layout.dim, "imported_from": str(layout.directory)}
    if model is None:
        logger.info("no model named: %s gives vector queries only (--model enables text queries)", layout.directory)
        return {**base, "fingerprint": f"clip-retrieval-{layout.digest()}", "source": None}
    if model.config.embed_dim != layout.dim:
        raise ValueError(
            f"model {source or '(given)'} makes {model.config.embed_dim}-dimensional embeddings but "
            f"{layout.shards[0].vectors} holds {layout.dim}-dimensional ones; name the model that made them (--model)"
        )
    _check_captions(layout, model, source)
    return {**base, "fingerprint": model.fingerprint(), "source": source}


def _check_captions(layout: EmbeddingsLayout, model: CLIP, source: str | None) -> None:
    """ValueError when `model` does not reproduce the first stored caption embeddings (see _SAME_MODEL)."""
    shard = layout.shards[0]
    texts_file = shard.vectors if layout.modality == "text" else shard.other
    rows = next(metadata_rows(shard, _CHECKED_CAPTIONS * 4), [])
    picked = [(i, r["caption"]) for i, r in enumerate(rows) if isinstance(r.get("caption"), str) and r["caption"]]
    picked = picked[:_CHECKED_CAPTIONS]
    if texts_file is None or not picked:
        logger.info("no captions with embeddings to check the model against: text queries assume %s made them", source)
        return
    stored = np.array(np.load(texts_file, mmap_mode="r")[[i for i, _ in picked]], dtype=np.float32)
    stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
    ours = embed_texts(model, [c for _, c in picked]).numpy()
    agreement = float(np.median((stored * ours).sum(axis=1)))
    if agreement < _SAME_MODEL:
        raise ValueError(
            f"model {source or '(given)'} does not reproduce the caption embeddings in {texts_file} (median cosine "
            f"{agreement:.3f} on {len(picked)} captions; the same model gives above 0.99): name the model that made "
            "them (--model), or leave --model out to index them for vector queries only"
        )
    logger.info("model %s reproduces the stored caption embeddings (median cosine %.4f)", source, agreement)


def _embedded_texts(model: CLIP | None, texts: Sequence[str] | None) -> np.ndarray | None:
    if not texts:
        return None
    if model is None:
        raise ValueError("tuning texts (--tune-queries) need the model that made the embeddings: pass --model")
    return embed_texts(model, list(dict.fromkeys(t for t in texts if t.strip()))).numpy()


def _tuning_queries(
    layout: EmbeddingsLayout, store: VectorStore, options: BuildOptions, texts: np.ndarray | None
) -> tuple[np.ndarray, str]:
    """Queries like the ones users will send: the given texts, else the other modality's embeddings
    (text_emb for an image index), else (with a warning) a sample of the indexed vectors."""
    limit = options.max_tuning_queries
    if texts is not None and len(texts):
        return texts[:limit], "given texts (text)"
    others = [(s.other, s.rows) for s in layout.shards if s.other is not None]
    if others:
        xq = sample_rows(others, limit)
        if len(xq):
            other = "text" if layout.modality == "image" else "image"
            return xq, f"{'text_emb' if other == 'text' else 'img_emb'} ({other})"
    logger.warning(
        "no embeddings of the other modality to tune with: tuning on indexed vectors, which overstates the "
        "recall of text queries; pass tuning texts (--tune-queries FILE) with --model"
    )
    return store.sample(min(limit, len(store))), f"indexed {layout.modality} vectors"


def _real_roots(roots: Sequence[str | Path] | None) -> list[str]:
    real = [os.path.realpath(r) for r in roots or ()]
    for root in real:
        if not os.path.isdir(root):
            raise ValueError(f"root {root} is not a folder; give the folders the indexed files live in")
    if not real:
        logger.info("no --root given: the service will not serve the image files (pass --root FOLDER to allow it)")
    return real
