"""Building and updating an index directory: embed (resumably, on one process or many), index, tune,
record metadata, publish atomically.

Every operation can be killed and run again with the same arguments: embedding resumes from its shards
(`retrieval.embedding_job`), and the commit writes a new version that becomes current in one rename
(`retrieval.store`). Items are identified by their key (the image path), so running `add` again after a
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from vlm.data import Failure
from vlm.embed import embed_images, embed_texts
from vlm.model import CLIP

from .embedding_job import EmbeddingJob, EmbedOptions, barrier, dist_info, preprocessing
from .index import SearchParams, VectorIndex, set_threads
from .kinds import IndexSpec, default_memory_budget, make_spec
from .metadata import METADATA_FILE, MetadataStore
from .sources import Collection, open_source
from .store import IndexCorruptError, IndexDirectory, Manifest
from .tuning import TuningReport, require_target, tune
from .vectors import VectorStore, count_after, merge_sorted, write_vectors

__all__ = ["BuildOptions", "UpdateReport", "build_index", "add_to_index", "remove_from_index", "QUERIES_FILE"]

logger = logging.getLogger(__name__)

QUERIES_FILE = "queries.npy"
_BUILD_MISSES = (
    "the index was not written; lower --target-recall, pass queries like the ones users will send "
    "(--tune-queries FILE), or use a kind that keeps full vectors (--kind ivf)"
)
_UPDATE_MISSES = (
    "this version was not published. An index of full vectors (flat, ivf) that misses is damaged: rebuild it "
    "with `vlm index build --overwrite`; compressed codes may need a lower --target-recall or a finer --kind there"
)
_METADATA_BATCH = 10_000
_PROMPTS = (
    "a photo of a {}.",
    "a picture of {}.",
    "{}",
    "an image of the {}.",
    "a close-up photo of a {}.",
    "a photo of many {}.",
)


@dataclass(frozen=True)
class BuildOptions:
    """How `vlm index build` and updates choose, size and tune the index, and how they embed."""

    kind: str = "auto"  # auto, flat, hnsw, ivf, ivfpq or a FAISS factory string
    memory_budget: int | None = None  # bytes the index may use in RAM; None: half the machine's memory
    on_disk: bool | None = None  # IVF lists in a memory-mapped file; None: auto decides
    k: int = 10  # tuning reaches target_recall at recall@k
    target_recall: float = 0.95
    max_tuning_queries: int = 1000
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    threads: int | None = None  # FAISS threads; None: this process's share of the CPUs

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"BuildOptions.k must be positive, got {self.k}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"BuildOptions.target_recall must be in (0, 1], got {self.target_recall}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"BuildOptions.memory_budget must be positive bytes, got {self.memory_budget}")


@dataclass
class UpdateReport:
    """What a build or update did."""

    directory: Path
    action: str  # build, add, upsert, remove, "unchanged", or "worker" (a process other than the first)
    version: int
    count: int  # items in the index afterwards
    added: int = 0
    updated: int = 0
    removed: int = 0
    skipped: int = 0  # items already in the index (add without upsert), or ids not in it (remove)
    failures: list[Failure] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # files left out: they resolve outside the roots
    spec: IndexSpec | None = None
    tuning: dict | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the user: the action, item counts, unreadable items, index kind, tuned recall, seconds."""
        if self.action == "worker":
            return "this process embedded its share of the collection; the first process writes the index"
        parts = [f"{self.action}: {self.count} items in {self.directory} (version {self.version})"]
        for name in ("added", "updated", "removed", "skipped"):
            if getattr(self, name):
                parts.append(f"{name} {getattr(self, name)}")
        if self.failures:
            parts.append(f"{len(self.failures)} unreadable (not indexed)")
        if self.outside:
            parts.append(f"{len(self.outside)} outside the roots (not indexed; --root adds a folder)")
        if self.spec is not None:
            parts.append(f"index {self.spec.factory}{' (on disk)' if self.spec.on_disk else ''}")
        if self.tuning:
            parts.append(f"recall@{self.tuning['k']} {self.tuning['recall']:.3f} with {_knobs(self.tuning['params'])}")
        return ", ".join(parts) + f" [{self.seconds:.1f}s]"


# ---- build ---------------------------------------------------------------------------------------
def build_index(
    source: Any,
    directory: str | Path,
    model: CLIP,
    *,
    options: BuildOptions = BuildOptions(),
    modality: str = "image",
    overwrite: bool = False,
    tuning_texts: Sequence[str] | None = None,
    model_source: str | None = None,
    **source_options: Any,
) -> UpdateReport:
    """Embeds `source` (anything `open_source` reads, or a `Collection`) and writes an index to `directory`.

    Under `accelerate launch` every process embeds its share; the first one then builds the index.
    `tuning_texts` are the queries to tune for (default: the collection's captions, else prompts made
    from its folder names). `model_source` is recorded so `vlm search` can load the same model.
    """
    start = time.perf_counter()
    set_threads(options.threads)
    collection = source if isinstance(source, Collection) else open_source(source, modality=modality, **source_options)
    store_dir = IndexDirectory(directory)
    fingerprint = model.fingerprint()
    digest = f"build-{collection.digest()}-{fingerprint[:8]}"
    manifest = _replaced_manifest(store_dir, overwrite)
    if manifest is not None:
        last = manifest.history[-1] if manifest.history else {}
        if last.get("job") == digest and not overwrite:  # this very build finished (then the process died?)
            _remove_job(store_dir.jobs_path() / digest)
            logger.info("%s already holds this build (version %d); nothing to do", directory, manifest.version)
            return UpdateReport(store_dir.path, "unchanged", manifest.version, manifest.count)
        if not overwrite:
            raise ValueError(
                f"{directory} already holds an index; pass --overwrite to replace it, or use `vlm index add` to add to it"
            )
    job = _embed_on_every_process(store_dir, digest, model, collection, options)
    if job is None:
        return UpdateReport(store_dir.path, "worker", 0, 0)
    with store_dir.writer():
        old = _replaced_manifest(store_dir, overwrite)
        version = old.version + 1 if old else 1
        vdir = store_dir.new_version(version)
        failures: list[Failure] = []
        store = _write_shards(vdir, job, failures, model.config.embed_dim)
        spec = make_spec(options.kind, len(store), store.dim, memory_budget=_budget(options), on_disk=options.on_disk)
        logger.info(
            "indexing %d vectors with %s%s", len(store), spec.factory, " (on-disk lists)" if spec.on_disk else ""
        )
        vindex = VectorIndex.build(spec, store, vdir, progress=options.embed.progress)
        xq, query_source = tuning_queries(model, collection, store, options, tuning_texts)
        report = _tune(vindex, xq, query_source, options, vdir)
        _write_metadata(vdir, collection, store.ids)
        vindex.write(vdir)
        manifest = Manifest(
            version=version,
            model=_model_record(model, fingerprint, model_source),
            preprocessing=preprocessing(model, options.embed.draft),
            modality=collection.modality,
            spec=spec.to_dict(),
            params=vindex.params.to_dict(),
            count=len(store),
            next_id=len(collection),
            tuning=report.to_dict() | {"count": len(store)},
            memory_budget=_budget(options),
            roots=collection.roots,
            history=old.history if old else [],
        )
        store_dir.publish(manifest, {"action": "build", "added": len(store), "failed": len(failures), "job": digest})
    _remove_job(job.directory)
    _log_failures(failures, len(collection))
    return UpdateReport(
        store_dir.path,
        "build",
        version,
        len(store),
        added=len(store),
        failures=failures,
        outside=collection.outside,
        spec=spec,
        tuning=manifest.tuning,
        seconds=time.perf_counter() - start,
    )


def _replaced_manifest(store_dir: IndexDirectory, overwrite: bool) -> Manifest | None:
    """The manifest a build replaces: None when there is none, or when it is damaged and `overwrite` is
    given (rebuilding is how a damaged index is repaired; the history starts again). IndexCorruptError
    for a damaged one without `overwrite`."""
    if not store_dir.exists():
        return None
    try:
        return store_dir.read_manifest()
    except IndexCorruptError:
        if not overwrite:
            raise
        logger.warning("%s is damaged: the new build starts a new history", store_dir.manifest_path)
        return None


def _embed_on_every_process(
    store_dir: IndexDirectory, digest: str, model: CLIP, collection: Collection, options: BuildOptions
) -> EmbeddingJob | None:
    """Runs this process's share of the embedding job and waits for the others; the finished job on the
    first process (which goes on to write the index), None on the others."""
    rank, world = dist_info()
    job = EmbeddingJob(store_dir.jobs_path() / digest, model, collection, options.embed, rank=rank, world_size=world)
    job.run()
    barrier()
    return job if rank == 0 else None


def _write_shards(vdir: Path, job: EmbeddingJob, failures: list[Failure], dim: int) -> VectorStore:
    """Streams the job's shards into the version's vector store (ids = positions); collects failures."""
    embedded, _ = job.counts()

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for shard in job.shards():
            failures.extend(shard.failures)
            yield shard.positions, shard.xb

    return write_vectors(vdir, chunks(), embedded, dim)


def _write_metadata(vdir: Path, collection: Collection, ids: np.ndarray) -> None:
    meta = MetadataStore(vdir / METADATA_FILE, writable=True)
    meta.create(list(collection.extra))
    for start in range(0, len(ids), _METADATA_BATCH):
        meta.insert({"id": int(i), **collection.row(int(i))} for i in ids[start : start + _METADATA_BATCH])
    meta.commit()
    meta.close()


# ---- tuning queries ------------------------------------------------------------------------------
def tuning_queries(
    model: CLIP, collection: Collection, store: VectorStore, options: BuildOptions, texts: Sequence[str] | None = None
) -> tuple[np.ndarray, str]:
    """Queries of the modality users will send, and where they came from (see `retrieval.tuning`).

    Image index: `texts`, else the collection's captions, else prompts made from its folder or label
    names, else (with a warning) a sample of the indexed vectors. Caption index: a sample of the
    collection's images.
    """
    limit, rng = options.max_tuning_queries, np.random.default_rng(0)
    if collection.modality == "text":
        firsts = collection.first_of_each_image()
        pick = [
            collection.images[firsts[i]]
            for i in sorted(rng.choice(len(firsts), min(limit, len(firsts)), replace=False))
        ]
        result = embed_images(
            model, pick, batch_size=options.embed.batch_size, draft=options.embed.draft, progress=False
        )
        if len(result.embeddings):
            return result.embeddings.numpy(), "collection images (image)"
    else:
        texts, source = _query_texts(collection, texts)
        if texts:
            texts = [texts[i] for i in sorted(rng.choice(len(texts), min(limit, len(texts)), replace=False))]
            return embed_texts(model, texts).numpy(), source
    logger.warning(
        "no queries of the other modality to tune with (no captions, folder names or labels): tuning on indexed "
        "vectors, which overstates the recall text queries will get; pass tuning texts (--tune-queries FILE)"
    )
    return store.sample(min(limit, len(store))), f"indexed {collection.modality} vectors"


def _query_texts(collection: Collection, texts: Sequence[str] | None) -> tuple[list[str], str]:
    if texts:
        return list(dict.fromkeys(t for t in texts if t.strip())), "given texts (text)"
    if collection.captions is not None:
        captions = list(dict.fromkeys(c for c in collection.captions if c))
        if captions:
            return captions, "captions (text)"
    for column in ("label", "folder"):
        names = {_label_words(v) for v in collection.extra.get(column, []) if v not in (None, "")}
        if len(names) > 1:
            return [p.format(n) for n in sorted(names) for p in _PROMPTS], f"prompts from {column} names (text)"
    return [], ""


def _label_words(value: Any) -> str:
    return str(value).rstrip("/").split("/")[-1].replace("_", " ").replace("-", " ").strip()


def _tune(vindex: VectorIndex, xq: np.ndarray, source: str, options: BuildOptions, vdir: Path) -> TuningReport:
    """Saves the tuning queries with the version and tunes on them; TargetRecallError when no knobs reach
    the target."""
    np.save(vdir / QUERIES_FILE, np.ascontiguousarray(xq, dtype=np.float32))
    report = tune(vindex, xq, k=options.k, target_recall=options.target_recall, query_source=source)
    return require_target(report, vindex.spec.factory, _BUILD_MISSES)


# ---- updates -------------------------------------------------------------------------------------
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
    job = _embed_on_every_process(store_dir, digest, model, batch, options)
    if job is None:
        return UpdateReport(store_dir.path, "worker", 0, 0)
    with store_dir.writer():
        manifest = _verified_manifest(store_dir, checked=manifest)  # another update may have committed meanwhile
        known = _current_meta(store_dir, manifest).ids_for_keys(batch.keys)
        shards = list(job.shards())
        positions = np.concatenate([s.positions for s in shards])
        xb = np.concatenate([s.xb for s in shards])
        failures = [f for s in shards for f in s.failures]
        ids = np.empty(len(positions), dtype=np.int64)
        next_id = manifest.next_id
        for j, p in enumerate(positions):
            key = batch.keys[p]
            if key in known:
                ids[j] = known[key]
            else:
                ids[j], next_id = next_id, next_id + 1
        rows = [{"id": int(i), **batch.row(int(p))} for i, p in zip(ids, positions)]
        updated = sum(1 for p in positions if batch.keys[p] in known)
        manifest = replace(manifest, roots=_joined_roots(manifest.roots, collection.roots))
        action = {
            "action": "upsert" if upsert else "add",
            "added": len(ids) - updated,
            "updated": updated,
            "job": digest,
        }
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
    _remove_job(job.directory)
    _log_failures(failures, len(batch))
    return UpdateReport(
        store_dir.path,
        action["action"],
        manifest.version,
        manifest.count,
        added=action["added"],
        updated=updated,
        skipped=skipped,
        failures=failures,
        outside=collection.outside,
        spec=IndexSpec.from_dict(manifest.spec),
        tuning=manifest.tuning,
        seconds=time.perf_counter() - start,
    )


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
        wanted = {int(i) for i in ids}
        for path in paths:
            wanted.update(meta.ids_for_path(str(Path(path).resolve())) or meta.ids_for_path(str(path)))
        if where:
            wanted.update(int(i) for i in meta.ids_where(where))
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
        vindex = VectorIndex.build(spec, store, vdir)
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


def _model_record(model: CLIP, fingerprint: str, source: str | None) -> dict:
    return {"fingerprint": fingerprint, "embed_dim": model.config.embed_dim, "source": source}


def _dim(manifest: Manifest) -> int:
    return int(manifest.model["embed_dim"])


def _budget(options: BuildOptions) -> int:
    return options.memory_budget if options.memory_budget is not None else default_memory_budget()


def _remove_job(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove_finished_jobs(store_dir: IndexDirectory, manifest: Manifest) -> None:
    """Job directories of updates the manifest records as committed (left by a kill after the commit)."""
    finished = {h.get("job") for h in manifest.history}
    jobs = store_dir.jobs_path()
    if jobs.is_dir():
        for entry in jobs.iterdir():
            if entry.name in finished:
                _remove_job(entry)


def _log_failures(failures: list[Failure], total: int) -> None:
    if failures:
        shown = ", ".join(f"{f.source} ({f.reason})" for f in failures[:5])
        logger.warning(
            "%d of %d items could not be read and were not indexed: %s%s",
            len(failures),
            total,
            shown,
            " ..." if len(failures) > 5 else "",
        )


def _knobs(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v) or "exact search"
