"""A FAISS index under stable int64 ids: build, add, remove, search with filters, on-disk lists.

Ids are FAISS labels (`add_with_ids`), never row positions, so they survive deletes: IVF indexes store
them in their inverted lists; flat and graph indexes sit in an ``IndexIDMap``. FAISS cannot delete from
an HNSW graph, so a removed HNSW vector becomes a tombstone: its label in the id map is set to a negative
number, a range selector keeps negative labels out of every search, and the graph is rebuilt from the
stored vectors once tombstones pass `COMPACT_FRACTION` of it. The same id can then be added again
(upsert) without its old vector coming back.

On-disk inverted lists (a memory-mapped file next to the index) are written once and never resized:
an update writes the next version's lists anew from the old entries it keeps and the new vectors, as a
build does (FAISS moves a growing on-disk list over its neighbours, see `VectorIndex._rewrite_lists`).

Filters are FAISS id selectors inside the search (``SearchParameters*(sel=...)``), never over-fetching.
Subsets of at most `EXACT_SUBSET_MAX` ids are searched exactly over their stored vectors instead: an
approximate index may hold fewer than k members of a tiny subset in the lists or graph region it visits.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import faiss
import numpy as np

from vlm.files import fsync_file

from .faiss_stdout import quiet_stdout
from .kinds import IndexSpec, default_memory_budget
from .ondisk import merge_blocks, plan_build, wanted_train_rows
from .vectors import CHUNK, VectorStore

__all__ = ["SearchParams", "Neighbors", "VectorIndex", "set_threads", "exact_search", "INDEX_FILE", "LISTS_FILE"]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
COMPACT_FRACTION = 0.25
EXACT_SUBSET_MAX = 4096
_INT64_MAX = np.iinfo(np.int64).max
_GATHER_BYTES = 4 << 20  # re-ranking gathers (queries, k * rerank, d) float32 vectors this large at a time: in
# cache (a micro-benchmark at 1,280 candidates a query, 1M x 512: 1.2 ms a query against 1.7 ms with 64 MiB)


@dataclass
class SearchParams:
    """Search-time knobs (0 = not used by this kind), chosen by `retrieval.tuning.tune`."""

    nprobe: int = 0  # IVF: inverted lists visited per query
    ef_search: int = 0  # HNSW: candidate list size
    rerank: int = 0  # candidates re-scored exactly with the stored vectors, as a multiple of k

    def to_dict(self) -> dict:
        """The knobs as a dict, as the manifest records them."""
        return asdict(self)


@dataclass
class Neighbors:
    """FAISS's result arrays: `D[i, j]` cosine similarity of query i to its j-th result `I[i, j]` (-1: none)."""

    D: np.ndarray  # (nq, k) float32
    I: np.ndarray  # (nq, k) int64


def set_threads(count: int | None = None) -> int:
    """FAISS's OpenMP threads: `count`, or this process's share of the CPUs it may run on (one share per
    local process under `accelerate launch`, so two ranks do not oversubscribe the cores)."""
    if count is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        count = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    faiss.omp_set_num_threads(count)
    return count


def exact_search(xq: np.ndarray, store: VectorStore, k: int, ids: np.ndarray | None = None) -> Neighbors:
    """Brute-force top-k by inner product over the stored vectors (all, or just `ids`): the oracle."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    if ids is not None:
        rows = store.rows(ids)
        rows = np.unique(rows[rows >= 0])
        xb, labels = np.ascontiguousarray(store.xb[rows]), store.ids[rows]
        return _topk_of(xq, [(np.asarray(labels), xb)], k)
    return _topk_of(xq, store.chunks(), k)


def _topk_of(xq: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> Neighbors:
    """Merges the top-k of each (ids, xb) chunk; FAISS's `knn` is the per-chunk kernel."""
    D = np.full((len(xq), k), -np.inf, dtype=np.float32)
    I = np.full((len(xq), k), -1, dtype=np.int64)
    for ids, xb in chunks:
        kk = min(k, len(ids))
        if kk == 0:
            continue
        Dc, Ic = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
        D, I = _merge_topk(D, I, Dc, np.where(Ic >= 0, ids[np.maximum(Ic, 0)], -1), k)
    return Neighbors(D, I)


def _merge_topk(D: np.ndarray, I: np.ndarray, Dc: np.ndarray, Ic: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    allD, allI = np.concatenate([D, Dc], axis=1), np.concatenate([I, Ic], axis=1)
    allD = np.where(allI >= 0, allD, -np.inf)
    order = np.argsort(-allD, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(allD, order, 1), np.take_along_axis(allI, order, 1)


@dataclass
class VectorIndex:
    """A FAISS index whose labels are the collection's ids, with its spec, search knobs and full vectors."""

    index: faiss.Index
    spec: IndexSpec
    params: SearchParams = field(default_factory=SearchParams)
    vectors: VectorStore | None = None
    _dead: int | None = field(default=None, repr=False)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def empty(cls, spec: IndexSpec, d: int) -> "VectorIndex":
        """An untrained, empty index of `spec` for `d`-dimensional vectors, scored by inner product, with
        the kind's default search knobs."""
        index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap(index)  # IVF lists store ids themselves; everything else needs the map
        return cls(index, spec, _default_params(spec))

    @classmethod
    def build(
        cls,
        spec: IndexSpec,
        store: VectorStore,
        directory: Path,
        *,
        progress: bool = False,
        seed: int = 0,
        memory_budget: int | None = None,
    ) -> "VectorIndex":
        """Trains on a sample of `store` and adds all of it, block by block, within `memory_budget` bytes of
        anonymous memory (default: half the machine's; see `retrieval.ondisk.plan_build`, which raises
        ValueError naming the smallest budget that would do). On-disk lists are written block by block in
        `directory` and merged into `directory/LISTS_FILE`."""
        plan = plan_build(spec, len(store), store.dim, memory_budget or default_memory_budget())
        vindex = cls.empty(spec, store.dim)
        vindex.vectors = store
        if not vindex.index.is_trained:  # the plan sizes IVF samples; a graph over SQ8 codes trains too
            vindex.train(store.sample(plan.train_rows or wanted_train_rows(spec, len(store)), seed))
        desc = "indexing (on disk)" if spec.on_disk else "indexing"
        chunks = _progress(store.chunks(plan.block_rows), progress, len(store), desc)
        if spec.on_disk:
            vindex._merge_on_disk((_block(vindex.index, ids, xb) for ids, xb in chunks), directory)
        else:
            for ids, xb in chunks:
                vindex.index.add_with_ids(xb, ids)
        return vindex

    def train(self, sample: np.ndarray) -> None:
        """Trains the quantisers (IVF centroids, PQ codebooks) on `sample` (n, d) float32; ValueError for
        an empty sample."""
        if len(sample) == 0:
            raise ValueError(f"cannot train a {self.spec.factory} index on an empty collection; use --kind flat")
        _limit_training(self.index)
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))

    def _merge_on_disk(self, blocks: Iterable[faiss.Index], directory: Path) -> None:
        """Writes each block (an in-memory copy of this empty, trained index holding some entries) to a
        file, then `merge_blocks` streams all their lists into `directory/LISTS_FILE`, which this index
        then maps: one block in RAM at a time. Without any entries the lists stay in memory, empty: FAISS
        cannot map an empty file."""
        folder = directory / "blocks.tmp"
        folder.mkdir(exist_ok=True)
        names, total = [], 0
        for i, block in enumerate(blocks):
            names.append(str(folder / f"block{i:05d}.index"))
            total += faiss.extract_index_ivf(block).invlists.compute_ntotal()
            faiss.write_index(block, names[-1])
        if total:
            merge_blocks(self.index, names, directory / LISTS_FILE)
            fsync_file(directory / LISTS_FILE)
        shutil.rmtree(folder)

    # ---- updates --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors (tombstones excluded)."""
        return self.index.ntotal - self.dead

    @property
    def dead(self) -> int:
        """Tombstones in the graph (counted on first use and again after a `remove`)."""
        if self._dead is None:
            self._dead = int((self._id_map() < 0).sum()) if self._tombstones() else 0
        return self._dead

    def update(self, remove: np.ndarray, add_ids: np.ndarray, add_xb: np.ndarray, directory: Path) -> None:
        """Deletes the ids `remove`, then adds the vectors `add_xb` (n, d) under `add_ids` (n,); an id in
        both is replaced (upsert). In-memory indexes change in place; on-disk lists are written anew
        into `directory/LISTS_FILE`, the lists they were read from stay untouched (see `_rewrite_lists`)."""
        if self.spec.on_disk:
            self._rewrite_lists(remove, add_ids, add_xb, directory)
        else:
            self.remove(remove)
            self.add(add_ids, add_xb)

    def _rewrite_lists(self, remove: np.ndarray, add_ids: np.ndarray, add_xb: np.ndarray, directory: Path) -> None:
        """Replaces the on-disk lists by new ones in `directory`: the old entries minus `remove`, then the
        new vectors, merged from blocks as a build merges them.

        FAISS cannot resize lists that `merge_ondisk` wrote: the merge leaves the whole file on the list
        of free slots (`OnDiskInvertedLists::merge_from_multiple` calls `update_totsize`, which frees the
        space it adds, then fills it with lists), so the first list that outgrows its slot on an add is
        moved over other lists: ids lost, garbage ids read from codes, codes under the wrong id."""
        old = self.index
        self.index = _empty_copy(old)
        kept = _kept_blocks(self.index, faiss.extract_index_ivf(old).invlists, np.asarray(remove, np.int64))
        added = (_block(self.index, ids, xb) for ids, xb in _chunks(add_ids, add_xb))
        self._merge_on_disk(itertools.chain(kept, added), directory)

    def add(self, ids: np.ndarray, xb: np.ndarray) -> None:
        """Adds the vectors xb (n, d), L2-normalised, under their ids (n,) int64; in place (in-memory
        indexes only: use `update`)."""
        assert not self.spec.on_disk, "on-disk lists are rewritten by `update`, never resized"
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), ids)

    def remove(self, ids: np.ndarray) -> None:
        """Deletes `ids` (unknown ids are ignored); in an HNSW graph they become tombstones. In-memory
        indexes only: use `update`."""
        assert not self.spec.on_disk, "on-disk lists are rewritten by `update`, never resized"
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return
        if self._tombstones():
            id_map = self._id_map()
            rows = np.nonzero(np.isin(id_map, ids))[0]
            id_map[rows] = -2 - rows  # distinct negative labels: never equal to a real id, never -1
            self._dead = None
        elif self.spec.fast_scan:
            self._reencode_without(ids)
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))

    def _reencode_without(self, ids: np.ndarray) -> None:
        """Empties the fast-scan lists and encodes the stored vectors of every entry not in `ids` again.
        FAISS 1.15.1 removes from fast-scan lists, but vectors added to a list after a removal are then
        lost or scored against other codes (0.3 of re-added vectors were their own nearest neighbour)."""
        ivf = faiss.extract_index_ivf(self.index)
        held = [faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                for i in range(ivf.nlist) if ivf.invlists.list_size(i)]
        kept = np.setdiff1d(np.concatenate(held) if held else np.zeros(0, np.int64), ids)
        self.index.reset()
        for start in range(0, len(kept), CHUNK):
            self.index.add_with_ids(self.vectors.get(kept[start : start + CHUNK]), kept[start : start + CHUNK])

    def needs_compaction(self) -> bool:
        """True when removed vectors left as HNSW tombstones exceed COMPACT_FRACTION of the graph: time to
        rebuild it from the stored vectors."""
        return self._tombstones() and self.dead > COMPACT_FRACTION * max(1, self.index.ntotal)

    def _tombstones(self) -> bool:
        return isinstance(self.index, faiss.IndexIDMap) and not _removable(self.index.index)

    def _id_map(self) -> np.ndarray:
        """A writable view of the IndexIDMap's labels (row -> id), no copy."""
        return faiss.rev_swig_ptr(self.index.id_map.data(), self.index.id_map.size())

    # ---- search ---------------------------------------------------------------------------------
    def search(
        self, xq: np.ndarray, k: int, *, allowed: np.ndarray | None = None, params: SearchParams | None = None
    ) -> Neighbors:
        """Top-k ids by cosine for each row of `xq` (L2-normalised), among `allowed` ids if given."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        params = params or self.params
        if allowed is not None:
            allowed = np.unique(np.asarray(allowed, dtype=np.int64))
            if len(allowed) == 0:
                return Neighbors(np.full((len(xq), k), -np.inf, np.float32), np.full((len(xq), k), -1, np.int64))
            if len(allowed) <= EXACT_SUBSET_MAX and self.vectors is not None:
                return exact_search(xq, self.vectors, k, allowed)
        fetch = k * params.rerank if params.rerank and self.vectors is not None else k
        selector = self._selector(allowed)
        D, I = self.index.search(xq, fetch, params=self._faiss_params(params, selector))
        if fetch > k:
            return self._rerank(xq, I, k)
        return Neighbors(np.where(I >= 0, D, -np.inf).astype(np.float32), I)

    def _selector(self, allowed: np.ndarray | None) -> faiss.IDSelector | None:
        if allowed is not None:
            return faiss.IDSelectorBatch(allowed)  # holds only real ids, so tombstones stay out too
        if self._tombstones() and self.dead:
            return faiss.IDSelectorRange(0, _INT64_MAX)
        return None

    def _faiss_params(self, params: SearchParams, selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        inner = self.index.index if isinstance(self.index, faiss.IndexIDMap) else self.index
        if faiss.try_extract_index_ivf(self.index) is not None:
            out = faiss.SearchParametersIVF()
            if params.nprobe:
                out.nprobe = params.nprobe
        elif isinstance(faiss.downcast_index(inner), faiss.IndexHNSW):
            out = faiss.SearchParametersHNSW()
            if params.ef_search:
                out.efSearch = params.ef_search
        elif selector is None:
            return None
        else:
            out = faiss.SearchParameters()
        if selector is not None:
            out.sel = selector
        return out

    def _rerank(self, xq: np.ndarray, candidates: np.ndarray, k: int) -> Neighbors:
        """Re-scores the candidates with their full stored vectors and keeps the best k."""
        D = np.full((len(xq), k), -np.inf, dtype=np.float32)
        I = np.full((len(xq), k), -1, dtype=np.int64)
        chunk = max(1, _GATHER_BYTES // (candidates.shape[1] * xq.shape[1] * 4))
        for start in range(0, len(xq), chunk):
            cand = candidates[start : start + chunk]
            rows = self.vectors.rows(cand.ravel()).reshape(cand.shape)
            if (rows[cand >= 0] < 0).any():
                raise KeyError(f"ids not in the vector store: {cand[(cand >= 0) & (rows < 0)][:10].tolist()}")
            # one gather of (queries, candidates, d) straight from the map and one batched product: a
            # de-duplicating gather (np.unique, then a second copy) took 10x as long as the fast-scan search
            xb = self.vectors.xb[np.maximum(rows, 0).ravel()].reshape(*cand.shape, -1)
            scores = np.matmul(xb, xq[start : start + len(cand), :, None])[..., 0]
            scores[rows < 0] = -np.inf
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            D[start : start + len(cand)] = np.take_along_axis(scores, order, 1)
            I[start : start + len(cand)] = np.where(
                np.isfinite(D[start : start + len(cand)]), np.take_along_axis(cand, order, 1), -1
            )
        return Neighbors(D, I)

    # ---- files ----------------------------------------------------------------------------------
    def write(self, directory: Path) -> None:
        """Writes and fsyncs `directory/index.faiss` (on-disk IVF lists stay in their own file)."""
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        fsync_file(directory / INDEX_FILE)

    @classmethod
    def read(
        cls,
        directory: Path,
        spec: IndexSpec,
        params: SearchParams,
        vectors: VectorStore | None,
        *,
        mmap: bool = False,
    ) -> "VectorIndex":
        """Reads `directory/INDEX_FILE`. On-disk lists are always memory-mapped, read-only (updates write
        new ones); `mmap=True` also maps the inverted lists of an in-memory IVF file. ValueError naming
        the file when a file is unreadable or the lists file is shorter than the index says."""
        path = directory / INDEX_FILE
        flags = 0
        if spec.on_disk:
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        elif mmap and spec.is_ivf:
            flags = faiss.IO_FLAG_MMAP
        try:
            with quiet_stdout():
                index = faiss.read_index(str(path), flags)
        except RuntimeError as err:
            raise ValueError(
                f"cannot read the FAISS index {path}: it is corrupted or truncated ({_last_line(err)}); "
                "restore the directory from a backup or rebuild it with `vlm index build`"
            ) from err
        _check_lists_size(index, directory / LISTS_FILE)
        return cls(index, spec, params, vectors)


def _limit_training(index: faiss.Index) -> None:
    """Caps the training of the OPQ rotation. FAISS's default (50 rounds, each re-training every
    sub-quantizer on 65k points) takes tens of minutes on two cores at d=512; fewer rounds and points lose
    little once candidates are re-ranked with the full vectors. The PQ codebooks keep FAISS's default
    (k-means on at most 256 points per centroid): capping them at 64 cost recall@10 0.01-0.02 in the tests."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = 8
                transform.niter_pq_0 = 8
                transform.max_train_points = 16_384


def _check_lists_size(index: faiss.Index, path: Path) -> None:
    """ValueError unless on-disk lists, if `index` has them, are as long as it says: FAISS maps the file
    without looking, and reading past its end kills the process (SIGBUS)."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if isinstance(lists, faiss.OnDiskInvertedLists) and path.stat().st_size < lists.totsize:
        raise ValueError(
            f"{path} has {path.stat().st_size} bytes but its index needs {lists.totsize} (truncated); "
            "restore the directory from a backup or rebuild it with `vlm index build`"
        )


def _block(empty: faiss.Index, ids: np.ndarray, xb: np.ndarray) -> faiss.Index:
    """An in-memory copy of the trained, empty IVF index `empty` holding the vectors xb under ids."""
    block = faiss.clone_index(empty)
    block.add_with_ids(np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return block


def _kept_blocks(empty: faiss.Index, lists: faiss.InvertedLists, drop: np.ndarray) -> Iterator[faiss.Index]:
    """Copies of `empty` holding the entries (codes as they are, no re-encoding) of `lists` whose ids are
    not in `drop`, about CHUNK entries each."""
    from faiss.contrib.inspect_tools import get_invlist

    block, held = faiss.clone_index(empty), 0
    for list_no in range(lists.nlist):
        ids, codes = get_invlist(lists, list_no)
        keep = ~np.isin(ids, drop)
        if keep.any():
            ids, codes = np.ascontiguousarray(ids[keep]), np.ascontiguousarray(codes[keep])
            faiss.extract_index_ivf(block).invlists.add_entries(
                list_no, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes)
            )
            held += len(ids)
        if held >= CHUNK:
            yield block
            block, held = faiss.clone_index(empty), 0
    if held:
        yield block


def _empty_copy(index: faiss.Index) -> faiss.Index:
    """A trained copy of the IVF index `index` with empty in-memory lists. FAISS cannot clone on-disk
    lists, so they are swapped out for empty ones while it copies."""
    ivf = faiss.extract_index_ivf(index)
    lists, own = ivf.invlists, ivf.own_invlists
    blank = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    blank.this.disown()  # owned by `ivf` until the lists are swapped back, which frees it
    ivf.own_invlists = False  # so swapping does not free the on-disk lists
    ivf.replace_invlists(blank, True)
    try:
        copy = faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, own)
    copy.ntotal = faiss.extract_index_ivf(copy).ntotal = 0
    return copy


def _chunks(ids: np.ndarray, xb: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK], xb[start : start + CHUNK]


def _removable(index: faiss.Index) -> bool:
    return not isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


def _default_params(spec: IndexSpec) -> SearchParams:
    """Knobs before tuning: FAISS's defaults, and 4x candidates for re-ranked codes."""
    return SearchParams(
        nprobe=1 if spec.is_ivf else 0, ef_search=16 if spec.is_hnsw else 0, rerank=4 if spec.rerank else 0
    )


def _train_size(spec: IndexSpec, n: int) -> int:
    """Training points for `n` vectors before a memory budget caps them (`retrieval.plan` scales by it)."""
    return wanted_train_rows(spec, n)


def _last_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__


def _progress(chunks: Iterable, enabled: bool, total: int, desc: str) -> Iterable:
    if not enabled:
        yield from chunks
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="vec", dynamic_ncols=True) as bar:
        for ids, xb in chunks:
            yield ids, xb
            bar.update(len(ids))
