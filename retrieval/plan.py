"""Which index `auto` builds, and what it will cost: trials on a sample, extrapolated to the collection.

Each candidate kind (`retrieval.kinds.candidates`: the kinds whose memory fits the budget) is built on a
random sample of the collection, at two sizes (a quarter of the sample, then all of it), and tuned to
the target recall against exact search on the tuning queries, as a full build is (`retrieval.tuning`).
What a trial measures is then scaled to the collection's size:

- bytes per vector: the kind's codes and id, plus its share of the coarse centroids (`IndexSpec`);
- build seconds: k-means costs training points x lists and assignment costs vectors x lists, so the
  sample's training and adding times are scaled by those products at the full size;
- query milliseconds: the time per query at the tuned knobs grows with the collection as a power law,
  its exponent fitted between the two sample sizes (clamped to [0.2, 1]: between a graph's and a
  scan's growth). A sample's lists sit in the CPU's cache, the collection's do not: the bytes a query
  reads at full size (the lists it visits, `nprobe` grown with the number of lists as it grew between
  the two samples, and the vectors it re-ranks) cost their time at the RAM bandwidth measured here, on
  top. The full index is tuned again after the build, so this is an estimate.

The candidate kept is the fastest one that reaches the target; with `max_query_ms`, the smallest in
memory among those estimated under it. A build records the estimate next to what it measured.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .index import VectorIndex, _train_size, exact_search
from .kinds import ID_BYTES, IndexSpec, candidates, format_bytes, make_spec
from .tuning import tune
from .vectors import VectorStore, write_vectors

__all__ = ["Estimate", "IndexPlan", "plan_index", "measured", "SAMPLE"]

logger = logging.getLogger(__name__)

SAMPLE = 50_000  # vectors a trial builds on: enough lists to tune like the full index, seconds to build
_GROWTH = (0.2, 1.0)  # bounds of the fitted exponent of query time in the collection size
_REPEATS = 2
_BANDWIDTH_BYTES = 256 << 20  # read to measure RAM bandwidth: well above a server CPU's last-level cache


@dataclass(frozen=True)
class Estimate:
    """A candidate's figures for the whole collection, as extrapolated from its trials (or measured)."""

    factory: str
    recall: float  # recall@k on the tuning queries at the sample size
    reached: bool  # the 95% lower bound of `recall` reaches the target
    params: dict  # the knobs tuning chose on the sample
    bytes_per_vector: float  # in RAM
    build_seconds: float
    query_ms: float  # per query, in batches of the tuning queries

    def line(self) -> str:
        """One line for people: factory, memory, build time, query time, recall."""
        knobs = ", ".join(f"{k}={v}" for k, v in self.params.items() if v) or "exact"
        return (
            f"{self.factory:<24} {format_bytes(self.bytes_per_vector):>10}/vector"
            f"  build ~{_duration(self.build_seconds)}"
            f"  query ~{self.query_ms:.3f} ms  recall {self.recall:.3f}{'' if self.reached else ' (misses)'}  {knobs}"
        )


@dataclass(frozen=True)
class IndexPlan:
    """The kind `auto` builds for `n` vectors of dimension `d`, and every candidate's estimate."""

    n: int
    d: int
    sample: int
    memory_budget: int
    max_query_ms: float | None
    target_recall: float
    k: int
    chosen: IndexSpec
    estimate: Estimate  # the chosen kind's
    candidates: tuple[Estimate, ...]

    def summary(self) -> str:
        """Several lines for people: the choice, its estimate, then each candidate's."""
        lines = [
            f"plan for {self.n:,} vectors of dimension {self.d} (memory budget {format_bytes(self.memory_budget)}"
            f"{'' if self.max_query_ms is None else f', at most {self.max_query_ms:g} ms a query'}, target recall@"
            f"{self.k} {self.target_recall}), from trials on {self.sample:,} sampled vectors:",
            f"  build        {self.chosen.factory}{' (on-disk lists)' if self.chosen.on_disk else ''}",
            f"  memory       ~{format_bytes(self.estimate.bytes_per_vector)} per vector, "
            f"~{format_bytes(self.estimate.bytes_per_vector * self.n)} in RAM",
            f"  build time   ~{_duration(self.estimate.build_seconds)}",
            f"  query time   ~{self.estimate.query_ms:.3f} ms per query",
            "  candidates:",
        ]
        return "\n".join(lines + [f"    {e.line()}" for e in self.candidates])

    def to_dict(self) -> dict:
        """JSON-ready fields (the manifest records them with a build)."""
        return {**asdict(self), "chosen": self.chosen.to_dict()}


def plan_index(
    sample: np.ndarray,
    xq: np.ndarray,
    n: int,
    *,
    memory_budget: int,
    max_query_ms: float | None = None,
    target_recall: float = 0.95,
    k: int = 10,
    on_disk: bool | None = None,
    specs: list[IndexSpec] | None = None,
) -> IndexPlan:
    """Tries each candidate kind for `n` vectors on `sample` (s, d), vectors drawn at random from them,
    with the tuning queries `xq` (nq, d); see the module docstring. `specs` replaces the candidates."""
    if len(sample) == 0 or n < len(sample):
        raise ValueError(f"need a non-empty sample of at most n={n} vectors, got {len(sample)}")
    if max_query_ms is not None and max_query_ms <= 0:
        raise ValueError(f"max_query_ms must be positive, got {max_query_ms}; e.g. 5")
    d = sample.shape[1]
    specs = specs or _candidates(n, d, memory_budget, on_disk)
    bandwidth = ram_bandwidth(min(_BANDWIDTH_BYTES, memory_budget // 8))
    estimates = [_trial(spec, sample, xq, n, k, target_recall, bandwidth) for spec in specs]
    for estimate in estimates:
        logger.info("plan: %s", estimate.line())
    index = _pick(estimates, max_query_ms)
    return IndexPlan(
        n, d, len(sample), memory_budget, max_query_ms, target_recall, k,
        specs[index], estimates[index], tuple(estimates),
    )


def measured(
    vindex: VectorIndex, xq: np.ndarray, k: int, recall: float, target: float, build_seconds: float, index_bytes: int
) -> Estimate:
    """The built and tuned index's real figures, to set next to a plan's estimate: `recall` what tuning
    measured, `index_bytes` its size in RAM (its index file), `build_seconds` what building took."""
    return Estimate(
        vindex.spec.factory,
        recall,
        recall >= target,
        vindex.params.to_dict(),
        index_bytes / max(1, vindex.ntotal),
        build_seconds,
        _query_ms(vindex, xq, k),
    )


def _candidates(n: int, d: int, memory_budget: int, on_disk: bool | None) -> list[IndexSpec]:
    specs = candidates(n, d, memory_budget)
    if on_disk:  # lists on disk: fast scan cannot, and RAM no longer limits the kinds
        specs = [replace(make_spec(kind, n, d), on_disk=True) for kind in ("ivf", "ivfpq")]
    elif on_disk is False:
        specs = [s for s in specs if not s.on_disk] or [make_spec("ivfpqfs", n, d)]
    return specs


def _pick(estimates: list[Estimate], max_query_ms: float | None) -> int:
    """Index of the fastest estimate that reaches the target (with `max_query_ms`: the smallest under it),
    else of the first (the most accurate kind; the build's tuning then says how far it misses)."""
    reached = [i for i, e in enumerate(estimates) if e.reached]
    if not reached:
        logger.warning("no candidate reached the target recall on the sample; trying %s", estimates[0].factory)
        return 0
    fastest = min(reached, key=lambda i: estimates[i].query_ms)
    if max_query_ms is None:
        return fastest
    quick = [i for i in reached if estimates[i].query_ms <= max_query_ms]
    if not quick:
        logger.warning(
            "no candidate is estimated under %g ms a query (the fastest, %s: %.3f ms); building that one",
            max_query_ms,
            estimates[fastest].factory,
            estimates[fastest].query_ms,
        )
        return fastest
    return min(quick, key=lambda i: (estimates[i].bytes_per_vector, estimates[i].query_ms))


def _trial(
    spec: IndexSpec, sample: np.ndarray, xq: np.ndarray, n: int, k: int, target: float, bandwidth: float
) -> Estimate:
    """Builds and tunes `spec`'s kind at a quarter of the sample and at all of it, then extrapolates
    (`bandwidth`: the RAM's, in bytes a second)."""
    sizes = sorted({max(1, len(sample) // 4), len(sample)})
    runs = [_run(spec, sample[:size], xq, k, target) for size in sizes]
    small, large = runs[0], runs[-1]
    growth = 1.0
    if len(runs) > 1 and small.query_ms > 0:
        growth = math.log(max(large.query_ms, 1e-9) / small.query_ms) / math.log(sizes[1] / sizes[0])
    growth = min(max(growth, _GROWTH[0]), _GROWTH[1])
    scale = n / sizes[-1]
    lists = max(1, spec.nlist) / max(1, large.nlist)
    points = _train_size(spec, n) / max(1, _train_size(large.spec, sizes[-1]))
    return Estimate(
        spec.factory,
        large.recall,
        large.reached,
        large.params,
        spec.bytes_per_vector(sample.shape[1]) + 4 * sample.shape[1] * spec.nlist / max(1, n),
        large.train_seconds * points * lists + large.add_seconds * scale * lists,
        large.query_ms * scale**growth + 1000 * _bytes_read(spec, sample.shape[1], n, k, small, large) / bandwidth,
    )


def _bytes_read(spec: IndexSpec, d: int, n: int, k: int, small: _Run, large: _Run) -> float:
    """Bytes a query reads from RAM in the full index, at the knobs tuned on the sample: the full vectors
    it re-ranks, and for IVF kinds the codes of the lists it visits (exact search's and a graph's trial
    times already grow with the collection)."""
    rerank = large.params.get("rerank", 0) * k * 4 * d
    if not spec.nlist:
        return rerank
    nprobe = _full_nprobe(small, large, spec.nlist)
    return nprobe * n / spec.nlist * (spec.bytes_per_vector(d) - ID_BYTES) + rerank


def _full_nprobe(small: _Run, large: _Run, nlist: int) -> float:
    """The lists a query will visit among `nlist`: the larger sample's tuned `nprobe`, grown with the
    number of lists as it grew from the smaller sample to the larger (nprobe ~ nlist^a, a in [0, 1])."""
    low, high = small.params.get("nprobe", 0), large.params.get("nprobe", 0)
    growth = 0.0
    if low and high and large.nlist > small.nlist:
        growth = min(max(math.log(high / low) / math.log(large.nlist / small.nlist), 0.0), 1.0)
    return min(nlist, high * (nlist / max(1, large.nlist)) ** growth)


@functools.cache
def ram_bandwidth(size: int = _BANDWIDTH_BYTES) -> float:
    """Bytes a second one thread reads from an array of `size` bytes (RAM when it exceeds the caches):
    the best of three sums, measured once a process."""
    block = np.ones(max(1, size // 4), np.float32)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        block.sum()
        best = min(best, time.perf_counter() - start)
    return block.nbytes / max(best, 1e-9)


@dataclass(frozen=True)
class _Run:
    spec: IndexSpec
    nlist: int
    recall: float
    reached: bool
    params: dict
    train_seconds: float
    add_seconds: float
    query_ms: float


def _run(spec: IndexSpec, xb: np.ndarray, xq: np.ndarray, k: int, target: float) -> _Run:
    """`spec`'s kind sized for len(xb) vectors, built in memory on them and tuned on `xq`."""
    small = replace(make_spec(spec.kind, len(xb), xb.shape[1], pq_m=spec.pq_m or None), on_disk=False)
    if spec.kind == "factory":
        small = replace(spec, on_disk=False)
    with tempfile.TemporaryDirectory(prefix="vlm_plan_") as tmp:
        store = write_vectors(Path(tmp), [(np.arange(len(xb), dtype=np.int64), xb)], len(xb), xb.shape[1])
        vindex = VectorIndex.empty(small, store.dim)
        vindex.vectors = store
        start = time.perf_counter()
        if not vindex.index.is_trained:
            vindex.train(store.sample(_train_size(small, len(store))))
        trained = time.perf_counter()
        vindex.add(store.ids, store.xb)
        added = time.perf_counter()
        truth = exact_search(xq, store, k)
        report = tune(vindex, xq, k=k, target_recall=target, query_source="plan sample", truth=truth)
        query_ms = _query_ms(vindex, xq, k)
        vindex = store = None  # the memory map must close before its directory goes (Windows)
    return _Run(
        small, small.nlist, report.recall, report.reached, report.params.to_dict(),
        trained - start, added - trained, query_ms,
    )


def _query_ms(vindex: VectorIndex, xq: np.ndarray, k: int) -> float:
    """Best of a few timed batches of `xq` at the index's knobs, in milliseconds per query."""
    best = math.inf
    for _ in range(_REPEATS):
        start = time.perf_counter()
        vindex.search(xq, k)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / max(1, len(xq))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_for_build(store: VectorStore, xq: np.ndarray, options, memory_budget: int) -> IndexPlan | None:
    """The plan an `auto` build (`options`: `retrieval.build.BuildOptions`) follows; None for a named
    kind, and where there is nothing to choose (exact search, or the one kind that fits)."""
    if options.kind != "auto" or len(_candidates(len(store), store.dim, memory_budget, options.on_disk)) < 2:
        return None
    return plan_index(
        store.sample(min(len(store), SAMPLE)),
        xq,
        len(store),
        memory_budget=memory_budget,
        max_query_ms=options.max_query_ms,
        target_recall=options.target_recall,
        k=options.k,
        on_disk=options.on_disk,
    )


def plan_record(
    plan: IndexPlan, vindex: VectorIndex, xq: np.ndarray, recall: float, build_seconds: float, directory: Path
) -> dict:
    """What the manifest records of a planned build: the plan, and the real figures of what was built
    (`recall`: what tuning measured on the full index)."""
    from .index import INDEX_FILE

    size = (directory / INDEX_FILE).stat().st_size
    actual = measured(vindex, xq, plan.k, recall, plan.target_recall, build_seconds, size)
    return {**plan.to_dict(), "actual": asdict(actual)}


def compare(record: dict) -> str:
    """The estimate of a planned build next to what it measured, for the build's summary line."""
    est, real, limit = record["estimate"], record["actual"], record.get("max_query_ms")
    over = limit is not None and real["query_ms"] > limit
    return (
        f"estimated {format_bytes(est['bytes_per_vector'])}/vector, build {_duration(est['build_seconds'])}, "
        f"{est['query_ms']:.3f} ms/query; measured {format_bytes(real['bytes_per_vector'])}/vector, "
        f"build {_duration(real['build_seconds'])}, {real['query_ms']:.3f} ms/query"
        + (
            f" (over --max-query-ms {limit:g}: the estimate came from a sample; `vlm index plan` lists the"
            " other kinds, and --kind builds one of them)"
            if over
            else ""
        )
    )


def plan_source(
    source,
    model=None,
    *,
    options=None,
    modality: str = "image",
    sample: int = SAMPLE,
    tuning_texts: list[str] | None = None,
    **source_options,
) -> IndexPlan:
    """`vlm index plan`: the plan for indexing `source`, from a sample of it. `source` is a collection
    (anything `open_source` reads; `model` embeds `sample` of its items and the tuning queries) or a
    folder of clip-retrieval embeddings (img_emb/, text_emb/, metadata/; no model needed, the other
    modality's embeddings are the tuning queries). `options` (`BuildOptions`) gives the budgets."""
    from .build import BuildOptions, build_budget
    from .index import set_threads

    options = options or BuildOptions()
    set_threads(options.threads)
    if Path(str(source)).is_dir() and (Path(str(source)) / "metadata").is_dir():
        xb, xq, n = _embeddings_sample(Path(str(source)), modality, sample, options.max_tuning_queries)
    else:
        if model is None:
            raise ValueError(
                f"planning for the collection {source!r} needs a model to embed a sample of it; pass --model"
            )
        xb, xq, n = _collection_sample(source, model, options, modality, sample, tuning_texts, source_options)
    return plan_index(
        xb,
        xq,
        n,
        memory_budget=build_budget(options),
        max_query_ms=options.max_query_ms,
        target_recall=options.target_recall,
        k=options.k,
        on_disk=options.on_disk,
    )


def _embeddings_sample(directory: Path, modality: str, sample: int, queries: int) -> tuple[np.ndarray, np.ndarray, int]:
    from .clip_retrieval import open_layout, sample_rows

    layout = open_layout(directory, modality)
    xb = sample_rows([(s.vectors, s.rows) for s in layout.shards], sample)
    others = [(s.other, s.rows) for s in layout.shards if s.other is not None]
    if not others:
        logger.warning("%s has no embeddings of the other modality: indexed vectors serve as queries", directory)
    xq = sample_rows(others or [(s.vectors, s.rows) for s in layout.shards], queries, seed=1)
    return xb, xq, layout.count


def _collection_sample(
    source, model, options, modality, sample, texts, source_options
) -> tuple[np.ndarray, np.ndarray, int]:
    from vlm.embed import embed_images, embed_texts

    from .build import tuning_queries
    from .sources import open_source

    collection = open_source(source, modality=modality, **source_options)
    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(collection), min(sample, len(collection)), replace=False).tolist())
    if collection.modality == "text":
        texts_all = collection.texts()
        xb = embed_texts(model, [texts_all[i] for i in picks]).numpy()
    else:
        batch = options.embed.batch_size
        images = [collection.images[i] for i in picks]
        result = embed_images(model, images, batch_size=batch, progress=options.embed.progress)
        xb = result.embeddings.numpy()
    if len(xb) == 0:
        raise ValueError(
            f"none of the {len(picks)} sampled items of {source!r} could be read; check the source's paths"
        )
    store = VectorStore(np.arange(len(xb), dtype=np.int64), np.ascontiguousarray(xb, dtype=np.float32))
    xq, _ = tuning_queries(model, collection, store, options, texts)
    return store.xb, xq, len(collection)
