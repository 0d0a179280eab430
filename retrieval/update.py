"""Updating an index directory: add (or upsert) the items of a collection, remove items, and publish the
next version atomically.

Every update can be killed and run again with the same arguments: embedding resumes from its shards
(`retrieval.embedding_job`), and the commit writes a new version that becomes current in one rename
(`retrieval.index_directory`). Items are identified by their key (the image path), so running `add` again after a
finished `add` adds nothing, and `upsert` replaces vectors and metadata under the same ids.

An update copies the current version into the next, so it first verifies that version in full (every
file's sha256, SQLite's check of the metadata), and after the change re-measures recall on the tuning
queries stored with the index: damage in, or a version that misses its target recall out, is an error
and nothing is published.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vlm.model import CLIP

from .build import QUERIES_FILE, BuildOptions, UpdateReport, embed_on_every_process, log_failures, remove_job
from .embedding_job import EmbeddingJob
from .index import SearchParams, VectorIndex, set_threads
from .kinds import IndexSpec
from .metadata import METADATA_FILE, MetadataStore
from .sources import Collection, open_source
from .index_directory import IndexDirectory, Manifest
from .tuning import require_target, tune
from .vectors import VectorStore, count_after, merge_sorted, write_vectors

__all__ = ["add_to_index", "remove_from_index"]

logger = logging.getLogger(__name__)

_UPDATE_MISSES = (
    "this version was not published. An index of full vectors (flat, ivf) that misses is damaged: rebuild it "
    "with `vlm index build --overwrite`; compressed codes may need a lower --target-recall or a finer --kind there"
)


# ---- add -----------------------------------------------------------------------------------------
def add_to_index(
    directory: str | Path,
    source: Any,
    model: CLIP,
    *,
    upsert: bool = False,
    options: BuildOptions = BuildOptions(),
    **source_options: Any,
) -> UpdateReport:
    """Embeds the items of `source` that the index does not hold yet and adds them under new ids.
    With `upsert`, items it holds are embedded again and replaced under their own ids."""
    start = time.perf_counter()
    set_threads(options.threads)
    store_dir = IndexDirectory(directory)
    manifest = _verified_manifest(store_dir)
    _check_model(model, manifest, directory)
    collection = (
        source if isinstance(source, Collection) else open_source(source, modality=manifest.modality, **source_options)
    )
    known = _current_meta(store_dir, manifest).ids_for_keys(collection.keys)
    todo = [i for i, key in enumerate(collection.keys) if upsert or key not in known]
    skipped = len(collection) - len(todo)
    if not todo:
        _remove_finished_jobs(store_dir, manifest)
        logger.info("%s: all %d items are already indexed; nothing to add", directory, len(collection))
        return UpdateReport(
            store_dir.path, "unchanged", manifest.version, manifest.count, skipped=skipped, outside=collection.outside
        )
    batch = collection.subset(todo)
    digest = f"add-{batch.digest()}-{manifest.model['fingerprint'][:8]}"
    job = embed_on_every_process(store_dir, digest, model, batch, options)
    if job is None:
        return UpdateReport(store_dir.path, "worker", 0, 0)
    with store_dir.writer():
        report = _commit_embedded(store_dir, manifest, job, batch, collection.roots, upsert=upsert, digest=digest)
    remove_job(job.directory)
    log_failures(report.failures, len(batch))
    return replace(report, skipped=skipped, outside=collection.outside, seconds=time.perf_counter() - start)


def _commit_embedded(
    store_dir: IndexDirectory,
    manifest: Manifest,
    job: EmbeddingJob,
    batch: Collection,
    roots: list[str],
    *,
    upsert: bool,
    digest: str,
) -> UpdateReport:
    """Commits the vectors the finished `job` embedded for `batch`: known keys keep their ids (upsert),
    new keys get the next ones; the index's roots gain `roots`. Runs under the writer lock."""
    manifest = _verified_manifest(store_dir, checked=manifest)  # another update may have committed meanwhile
    known = _current_meta(store_dir, manifest).ids_for_keys(batch.keys)
    shards = list(job.shards())
    positions = np.concatenate([s.positions for s in shards])
    xb = np.concatenate([s.xb for s in shards])
    failures = [f for s in shards for f in s.failures]
    ids, next_id = _assign_ids([batch.keys[p] for p in positions], known, manifest.next_id)
    rows = [{"id": int(i), **batch.row(int(p))} for i, p in zip(ids, positions)]
    updated = sum(1 for p in positions if batch.keys[p] in known)
    manifest = replace(manifest, roots=_joined_roots(manifest.roots, roots))
    action = {"action": "upsert" if upsert else "add", "added": len(ids) - updated, "updated": updated, "job": digest}
    manifest = _commit(
        store_dir,
        manifest,
        remove=np.zeros(0, np.int64),
        add_ids=ids,
        add_xb=xb,
        rows=rows,
        next_id=next_id,
        action=action,
    )
    return UpdateReport(
        store_dir.path,
        action["action"],
        manifest.version,
        manifest.count,
        added=action["added"],
        updated=updated,
        failures=failures,
        spec=IndexSpec.from_dict(manifest.spec),
        tuning=manifest.tuning,
    )


def _assign_ids(keys: Sequence[str], known: dict[str, int], next_id: int) -> tuple[np.ndarray, int]:
    """The id of each key (its own when `known`, else the next free one, in order) and the next free id after."""
    ids = np.empty(len(keys), dtype=np.int64)
    for j, key in enumerate(keys):
        if key in known:
            ids[j] = known[key]
        else:
            ids[j], next_id = next_id, next_id + 1
    return ids, next_id


# ---- remove --------------------------------------------------------------------------------------
def remove_from_index(
    directory: str | Path,
    *,
    ids: Iterable[int] = (),
    paths: Iterable[str] = (),
    where: str | None = None,
) -> UpdateReport:
    """Removes the items with these ids, these image paths, or matching the metadata filter `where`."""
    start = time.perf_counter()
    store_dir = IndexDirectory(directory)
    with store_dir.writer():
        manifest = _verified_manifest(store_dir)
        meta = _current_meta(store_dir, manifest)
        wanted = _ids_wanted(meta, ids, paths, where)
        present = [item.id for item in meta.get_many(sorted(wanted)) if item is not None]
        skipped = len(wanted) - len(present)
        if not present:
            logger.info("%s: nothing to remove", directory)
            return UpdateReport(store_dir.path, "unchanged", manifest.version, manifest.count, skipped=skipped)
        remove = np.asarray(present, dtype=np.int64)
        action = {"action": "remove", "removed": len(remove)}
        manifest = _commit(
            store_dir,
            manifest,
            remove=remove,
            add_ids=np.zeros(0, np.int64),
            add_xb=np.zeros((0, _dim(manifest)), np.float32),
            rows=[],
            next_id=manifest.next_id,
            action=action,
        )
    return UpdateReport(
        store_dir.path,
        "remove",
        manifest.version,
        manifest.count,
        removed=len(remove),
        skipped=skipped,
        spec=IndexSpec.from_dict(manifest.spec),
        tuning=manifest.tuning,
        seconds=time.perf_counter() - start,
    )


def _ids_wanted(meta: MetadataStore, ids: Iterable[int], paths: Iterable[str], where: str | None) -> set[int]:
    """The ids named, the ids of the items of `paths` (as given or resolved), and the ids matching `where`."""
    wanted = {int(i) for i in ids}
    for path in paths:
        wanted.update(meta.ids_for_path(str(Path(path).resolve())) or meta.ids_for_path(str(path)))
    if where:
        wanted.update(int(i) for i in meta.ids_where(where))
    return wanted


# ---- commit --------------------------------------------------------------------------------------
def _commit(
    store_dir: IndexDirectory,
    manifest: Manifest,
    *,
    remove: np.ndarray,
    add_ids: np.ndarray,
    add_xb: np.ndarray,
    rows: list[dict],
    next_id: int,
    action: dict,
) -> Manifest:
    """Writes the next version (metadata, vectors, index) from the current one plus the changes, re-tunes
    it, then publishes it. `add_ids` that are already present replace their old vectors (upsert).
    TargetRecallError, and nothing published, when the new version cannot reach the target recall."""
    old_dir = store_dir.version_path(manifest)
    new = replace(manifest, version=manifest.version + 1, next_id=next_id)
    vdir = store_dir.new_version(new.version)
    meta = MetadataStore(vdir / METADATA_FILE, writable=True)
    meta.copy_from(MetadataStore(old_dir / METADATA_FILE))
    meta.delete(remove)
    meta.insert(rows)
    meta.commit()
    meta.close()
    old_store = VectorStore.open(old_dir)
    store = write_vectors(
        vdir, merge_sorted(old_store, remove, add_ids, add_xb), count_after(old_store, remove, add_ids), old_store.dim
    )
    spec = IndexSpec.from_dict(manifest.spec)
    vindex = VectorIndex.read(old_dir, spec, SearchParams(**manifest.params), store)
    vindex.update(np.union1d(remove, add_ids), add_ids, add_xb, vdir)
    if vindex.needs_compaction():
        logger.info("rebuilding the %s graph without its %d tombstones", spec.factory, vindex.dead)
        params = vindex.params
        vindex = VectorIndex.build(spec, store, vdir, memory_budget=manifest.memory_budget)  # the build's budget
        vindex.params = params
    new.tuning = _retune(vindex, old_dir, vdir, manifest.tuning)
    vindex.write(vdir)
    new.params, new.count = vindex.params.to_dict(), len(store)
    store_dir.publish(new, action)
    return new


def _retune(vindex: VectorIndex, old_dir: Path, vdir: Path, tuning: dict | None) -> dict | None:
    """The tuning record of the updated index: recall re-measured on the queries stored with the old
    version (copied into the new one) and the knobs re-tuned, after every update, however small: an
    update that damaged the index shows here. TargetRecallError when the target is out of reach. An
    index without stored queries (or tuning) keeps its record and knobs."""
    if not (old_dir / QUERIES_FILE).is_file():
        return tuning
    shutil.copyfile(old_dir / QUERIES_FILE, vdir / QUERIES_FILE)
    if tuning is None:
        return None
    xq = np.load(vdir / QUERIES_FILE)
    report = tune(vindex, xq, k=tuning["k"], target_recall=tuning["target_recall"], query_source=tuning["query_source"])
    require_target(report, vindex.spec.factory, _UPDATE_MISSES)
    return report.to_dict() | {"count": vindex.ntotal}


# ---- helpers -------------------------------------------------------------------------------------
def _verified_manifest(store_dir: IndexDirectory, checked: Manifest | None = None) -> Manifest:
    """The current manifest, its version verified in full (every file's sha256, SQLite's own check of the
    metadata): an update copies that version into the next and must not carry damage over.
    IndexCorruptError naming the damaged file. A version already `checked` is not hashed again:
    published versions are never written to."""
    manifest = store_dir.read_manifest()
    if checked is None or manifest.version != checked.version:
        store_dir.verify(manifest, full=True)
    return manifest


def _current_meta(store_dir: IndexDirectory, manifest: Manifest) -> MetadataStore:
    return MetadataStore(store_dir.version_path(manifest) / METADATA_FILE)


def _joined_roots(recorded: list[str] | None, added: list[str]) -> list[str] | None:
    """The roots an index records after an add: the ones it had, then the new collection's, each once.
    None (an index written before roots were recorded) stays None."""
    return None if recorded is None else list(dict.fromkeys([*recorded, *added]))


def _check_model(model: CLIP, manifest: Manifest, directory: str | Path) -> None:
    fingerprint = model.fingerprint()
    if fingerprint != manifest.model["fingerprint"]:
        raise ValueError(
            f"{directory} was built with model {manifest.model.get('source') or '?'} (fingerprint "
            f"{manifest.model['fingerprint']}), but the model given has fingerprint {fingerprint}: vectors of "
            f"two models cannot share an index. Use --model {manifest.model.get('source') or '<that model>'}, "
            "or build a new index with this model"
        )


def _dim(manifest: Manifest) -> int:
    return int(manifest.model["embed_dim"])


def _remove_finished_jobs(store_dir: IndexDirectory, manifest: Manifest) -> None:
    """Job directories of updates the manifest records as committed (left by a kill after the commit)."""
    finished = {h.get("job") for h in manifest.history}
    jobs = store_dir.jobs_path()
    if jobs.is_dir():
        for entry in jobs.iterdir():
            if entry.name in finished:
                remove_job(entry)
