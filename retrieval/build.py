"""Building an index directory: embed (resumably, on one process or many), index, tune, record
metadata, publish atomically. Updates live in `retrieval.update`; what both share is here (options, the
report, the embedding step, the file of tuning queries).

A build can be killed and run again with the same arguments: embedding resumes from its shards
(`retrieval.embedding_job`), and the version it writes becomes current in one rename (`retrieval.index_directory`).
Running a finished build again does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from vlm.data import Failure
from vlm.embed import embed_images, embed_texts
from vlm.model import CLIP

from .embedding_job import EmbeddingJob, EmbedOptions, barrier, dist_info, preprocessing
from .index import VectorIndex, set_threads
from .kinds import IndexSpec, default_memory_budget, make_spec
from .metadata import METADATA_FILE, MetadataStore
from .plan import compare, plan_for_build, plan_record
from .sources import Collection, open_source
from .index_directory import IndexCorruptError, IndexDirectory, Manifest
from .tuning import TuningReport, require_target, tune
from .vectors import VectorStore, write_vectors

__all__ = ["BuildOptions", "UpdateReport", "build_index", "QUERIES_FILE"]

logger = logging.getLogger(__name__)

QUERIES_FILE = "queries.npy"
_BUILD_MISSES = (
    "the index was not written; lower --target-recall, pass queries like the ones users will send "
    "(--tune-queries FILE), or use a kind that keeps full vectors (--kind ivf)"
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
    max_query_ms: float | None = None  # auto: prefer the smallest kind estimated under this (retrieval.plan)
    pq_m: int | None = None  # ivfpq: bytes a code; ivfpqfs: 4-bit sub-quantizers; None: the kind's default

    def __post_init__(self) -> None:
        if self.pq_m is not None and (self.pq_m <= 0 or self.kind not in ("ivfpq", "ivfpqfs")):
            raise ValueError(
                f"BuildOptions.pq_m is for --kind ivfpq or ivfpqfs (a positive number), got {self.pq_m} with kind "
                f"{self.kind!r}; drop --pq-m or name one of those kinds"
            )
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
        if self.tuning and self.tuning.get("plan"):
            parts.append(compare(self.tuning["plan"]))
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
    finished = finished_build(store_dir, digest, overwrite, directory)
    if finished is not None:
        return finished
    job = embed_on_every_process(store_dir, digest, model, collection, options, require_items=True)
    if job is None:
        return UpdateReport(store_dir.path, "worker", 0, 0)
    with store_dir.writer():
        report = _write_build(
            store_dir,
            job,
            collection,
            model,
            options,
            overwrite=overwrite,
            tuning_texts=tuning_texts,
            model_record=_model_record(model, fingerprint, model_source),
            digest=digest,
        )
    remove_job(job.directory)
    log_failures(report.failures, len(collection))
    report.seconds = time.perf_counter() - start
    return report


def finished_build(
    store_dir: IndexDirectory, digest: str, overwrite: bool, directory: str | Path
) -> UpdateReport | None:
    """The report of this very build when the directory already holds it (finished, then the process
    died?), None when there is nothing to replace or `overwrite` is given; ValueError for another index."""
    manifest = replaced_manifest(store_dir, overwrite)
    if manifest is None or overwrite:
        return None
    last = manifest.history[-1] if manifest.history else {}
    if last.get("job") != digest:
        raise ValueError(
            f"{directory} already holds an index; pass --overwrite to replace it, or use `vlm index add` to add to it"
        )
    remove_job(store_dir.jobs_path() / digest)
    logger.info("%s already holds this build (version %d); nothing to do", directory, manifest.version)
    return UpdateReport(store_dir.path, "unchanged", manifest.version, manifest.count)


def _write_build(
    store_dir: IndexDirectory,
    job: EmbeddingJob,
    collection: Collection,
    model: CLIP,
    options: BuildOptions,
    *,
    overwrite: bool,
    tuning_texts: Sequence[str] | None,
    model_record: dict,
    digest: str,
) -> UpdateReport:
    """Writes and publishes the version built from the finished `job`: vectors, index, tuning queries,
    metadata. Runs under the writer lock; the report lacks the seconds."""
    old = replaced_manifest(store_dir, overwrite)
    version = old.version + 1 if old else 1
    vdir = store_dir.new_version(version)
    failures: list[Failure] = []
    store = _write_shards(vdir, job, failures, model.config.embed_dim)
    xq, query_source = tuning_queries(model, collection, store, options, tuning_texts)
    spec, vindex, tuning = index_vectors(store, xq, query_source, options, vdir)
    _write_metadata(vdir, collection, store.ids)
    manifest = Manifest(
        version=version,
        model=model_record,
        preprocessing=preprocessing(model, options.embed.draft),
        modality=collection.modality,
        spec=spec.to_dict(),
        params=vindex.params.to_dict(),
        count=len(store),
        next_id=len(collection),
        tuning=tuning,
        memory_budget=build_budget(options),
        roots=collection.roots,
        history=old.history if old else [],
    )
    action = {"action": "build", "added": len(store), "failed": len(failures), "job": digest}
    store_dir.publish(manifest, action)
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
    )


def index_vectors(
    store: VectorStore, xq: np.ndarray, query_source: str, options: BuildOptions, vdir: Path
) -> tuple[IndexSpec, VectorIndex, dict]:
    """Chooses the index (`auto`: trials of the candidate kinds, `retrieval.plan`), builds it over `store`
    within the memory budget, tunes it on the queries `xq` and writes it to `vdir`. Returns the spec, the
    index and the tuning record (with a planned build's estimate beside its measured figures)."""
    plan = plan_for_build(store, xq, options, build_budget(options))
    spec = plan.chosen if plan else make_spec(
        options.kind,
        len(store),
        store.dim,
        memory_budget=build_budget(options),
        on_disk=options.on_disk,
        pq_m=options.pq_m,
    )
    logger.info("indexing %d vectors with %s%s", len(store), spec.factory, " (on-disk lists)" if spec.on_disk else "")
    started = time.perf_counter()
    vindex = VectorIndex.build(spec, store, vdir, progress=options.embed.progress, memory_budget=build_budget(options))
    built = time.perf_counter() - started
    tuning = _tune(vindex, xq, query_source, options, vdir).to_dict() | {"count": len(store)}
    vindex.write(vdir)
    if plan is not None:
        tuning["plan"] = plan_record(plan, vindex, xq, tuning["recall"], built, vdir)
    return spec, vindex, tuning


def replaced_manifest(store_dir: IndexDirectory, overwrite: bool) -> Manifest | None:
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


def embed_on_every_process(
    store_dir: IndexDirectory,
    digest: str,
    model: CLIP,
    collection: Collection,
    options: BuildOptions,
    *,
    require_items: bool = False,
) -> EmbeddingJob | None:
    """Runs this process's share of the embedding job and waits for the others; the finished job on the
    first process (which goes on to write the index), None on the others. With `require_items`, a job
    where every item failed is a ValueError on every process (see `_require_embedded`)."""
    rank, world = dist_info()
    job = EmbeddingJob(store_dir.jobs_path() / digest, model, collection, options.embed, rank=rank, world_size=world)
    job.run()
    barrier()
    if require_items:
        _require_embedded(store_dir, job, rank)
    return job if rank == 0 else None


def _require_embedded(store_dir: IndexDirectory, job: EmbeddingJob, rank: int) -> None:
    """ValueError naming the first unreadable items when not one item of the finished `job` could be
    embedded: an index of nothing would answer every query with nothing. Every process reads the shards
    and so raises alike; the first deletes the job afterwards (a rerun must read the files again, not
    resume the failures)."""
    embedded, failed = job.counts()
    if embedded or not failed:
        return
    first: list[Failure] = []
    for chunk in range(job.num_chunks):
        first.extend(job.read_shard(chunk).failures[: 5 - len(first)])
        if len(first) == 5:
            break
    barrier()  # every process has read the shards before they go
    if rank == 0:
        remove_job(job.directory)
        with contextlib.suppress(OSError):
            store_dir.jobs_path().rmdir()  # only when no other job is in it
    raise ValueError(
        f"none of the {failed} items could be read, so there is nothing to index and no index was written; "
        f"the first: {_named(first, failed)}. Check the source's paths (a table's relative paths resolve against "
        "the table's own folder) and --image-column"
    )


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


# ---- helpers -------------------------------------------------------------------------------------
def _model_record(model: CLIP, fingerprint: str, source: str | None) -> dict:
    return {"fingerprint": fingerprint, "embed_dim": model.config.embed_dim, "source": source}


def build_budget(options: BuildOptions) -> int:
    """The memory budget of a build in bytes: the one given, else half the machine's memory."""
    return options.memory_budget if options.memory_budget is not None else default_memory_budget()


def remove_job(path: Path) -> None:
    """Deletes an embedding job's directory (its shards), once the version built from it is published."""
    shutil.rmtree(path, ignore_errors=True)


def log_failures(failures: list[Failure], total: int) -> None:
    """Warns about the items that could not be read (the first five by name) among `total`."""
    if failures:
        logger.warning(
            "%d of %d items could not be read and were not indexed: %s", len(failures), total, _named(failures)
        )


def _named(failures: list[Failure], total: int | None = None) -> str:
    """The first five failures as "path (reason), ...", with " ..." when there are more (of `total`)."""
    more = (total if total is not None else len(failures)) > 5
    return ", ".join(f"{f.source} ({f.reason})" for f in failures[:5]) + (" ..." if more else "")


def _knobs(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if v) or "exact search"
