"""How an index build spends its memory budget, and the merge of on-disk inverted lists.

A build holds at most: the trained, empty index (coarse centroids, rotation, codebooks), a training
sample while it trains, then one block of vectors being encoded, plus the index's own lists when they
live in RAM. `plan_build` sizes the sample and the blocks from the budget, so the anonymous memory of
a build stays under it however large the collection is; the vectors themselves and on-disk lists are
memory-mapped files (page cache, which the kernel reclaims), not anonymous memory.

FAISS's `merge_ondisk` leaves every block's lists mapped for the life of the process (it disowns them),
so the deleted block files keep their disk space until exit; `merge_blocks` unmaps them after the merge.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import faiss

from .faiss_stdout import quiet_stdout
from .kinds import ID_BYTES, TRAIN_POINTS_PER_LIST, IndexSpec, format_bytes

__all__ = ["BuildPlan", "plan_build", "wanted_train_rows", "merge_blocks", "MemoryPeak", "resident_memory"]

logger = logging.getLogger(__name__)

# k-means and PQ training samples: enough for every centroid, capped because training cost grows with it.
MIN_TRAIN = 65_536
# Below this many training points per list k-means centroids are mostly noise: refuse rather than build.
MIN_POINTS_PER_LIST = 8
MAX_BLOCK = 65_536  # rows per block: larger blocks only save a few block files
MIN_BLOCK = 1024  # below this, the clone of the trained index and a file per block dominate
# Planned working memory (sample, blocks) takes this share of what the trained index, the lists kept in
# RAM and FAISS's scoring tile leave of the budget; the rest absorbs what the model leaves out (small
# per-thread buffers, the allocator's fragmentation, Python objects: at 0.75 a 64 MiB build of 150k x 512
# peaked anywhere from 41 to 65 MiB, at 0.6 from 40 to 46 MiB). Lists kept in RAM are counted at
# their final size, as `auto` chooses kinds by it: std::vector growth can hold up to twice that.
PLANNED_FRACTION = 0.6
# Training points the OPQ rotation trains on at most (`index._limit_training` caps it there); PQ k-means
# subsamples inside FAISS, per sub-space, and needs only the residuals' copies counted here.
ENCODER_TRAIN_ROWS = 16_384
KMEANS_MAX_PER_LIST = 256  # FAISS's ClusteringParameters.max_points_per_centroid: it subsamples beyond


@dataclass(frozen=True)
class BuildPlan:
    """What a build of `n` vectors may hold at once under `budget` bytes of anonymous memory."""

    budget: int
    train_rows: int  # training sample size
    block_rows: int  # vectors encoded (and, with on-disk lists, written out) at a time
    fixed: int  # bytes of the trained, empty index (estimate)
    resident: int  # bytes of inverted lists or graph held in RAM once everything is added (0 on disk)


def plan_build(spec: IndexSpec, n: int, d: int, budget: int) -> BuildPlan:
    """The training sample and block sizes that keep a build of `n` `d`-dimensional vectors with `spec`
    under `budget` bytes; ValueError naming the smallest budget that would do when none fits."""
    row = 4 * d
    fixed = _fixed_bytes(spec, d)
    resident = 0 if spec.on_disk else int(n * spec.bytes_per_vector(d))
    # the sample (and its rotated copy), k-means' assignment and distance of each point
    train_cost = row * (2 if _rotates(spec) else 1) + 16
    encoder = 2 * ENCODER_TRAIN_ROWS * row if _has_pq(spec) else 0
    # the block's input copy and its transformed/residual copy, then its entries (lists grow by doubling)
    add_cost = 2 * row + 2 * (_code_bytes(spec, d) + ID_BYTES) + 32
    spare = budget - _blas_tile()  # what the scoring tile of k-means, assignment and exact search leave
    wanted = wanted_train_rows(spec, n) if _trains(spec) else 0
    least_train = min(n, max(spec.nlist * MIN_POINTS_PER_LIST, 1)) if wanted else 0
    train_rows = min(wanted, max(0, int((spare - fixed - encoder) * PLANNED_FRACTION)) // train_cost)
    block_room = max(0, int((spare - 2 * fixed - resident) * PLANNED_FRACTION))
    block_rows = min(MAX_BLOCK, max(n, 1), block_room // add_cost)
    least_block = min(MIN_BLOCK, max(n, 1))
    if train_rows < least_train or block_rows < least_block:
        need = _blas_tile() + max(
            fixed + encoder + least_train * train_cost / PLANNED_FRACTION,
            2 * fixed + resident + least_block * add_cost / PLANNED_FRACTION,
        )
        raise ValueError(
            f"a memory budget of {format_bytes(budget)} is too small to build {spec.factory}"
            f"{' with on-disk lists' if spec.on_disk else ''} over {n} vectors of dimension {d}: it needs at "
            f"least {format_bytes(need)} ({_needs(fixed, encoder, resident, wanted > 0)}); "
            f"raise --memory-budget{_or_else(spec, resident)}"
        )
    if train_rows < wanted:
        logger.info(
            "training %s on %d vectors (%d wanted): the memory budget %s holds no more",
            spec.factory, train_rows, wanted, format_bytes(budget),
        )
    return BuildPlan(budget, train_rows, block_rows, fixed, resident)


def wanted_train_rows(spec: IndexSpec, n: int) -> int:
    """Training points a build of `n` vectors takes when the memory budget allows. Never more than FAISS's
    k-means keeps (a copied random subset of `KMEANS_MAX_PER_LIST` a list) or its codes train on."""
    wanted = min(n, max(MIN_TRAIN, spec.nlist * TRAIN_POINTS_PER_LIST))
    return min(wanted, max(spec.nlist * KMEANS_MAX_PER_LIST, ENCODER_TRAIN_ROWS)) if spec.nlist else wanted


def _or_else(spec: IndexSpec, resident: int) -> str:
    if not resident:
        return ""
    if spec.fast_scan:  # FAISS's on-disk lists cannot hold fast-scan codes
        return ", or build --kind ivfpq --on-disk"
    return ", or keep the lists on disk (--on-disk)" if spec.is_ivf else ", or let --kind auto pick a kind that fits"


def _needs(fixed: int, encoder: int, resident: int, trains: bool) -> str:
    parts = [f"trained index {format_bytes(fixed)}"] if fixed else []
    if encoder:
        parts.append(f"training the codes {format_bytes(encoder)}")
    if resident:
        parts.append(f"the index in RAM {format_bytes(resident)}")
    parts.append("a training sample and a block of vectors" if trains else "a block of vectors")
    return ", ".join(parts)


def _blas_tile() -> int:
    """Bytes of the block of scores FAISS's brute-force kernel fills at a time (k-means, assigning vectors
    to lists, exact search): 16 MiB with its default block sizes, whatever the collection."""
    return 4 * faiss.cvar.distance_compute_blas_query_bs * faiss.cvar.distance_compute_blas_database_bs


def _fixed_bytes(spec: IndexSpec, d: int) -> int:
    """Upper estimate of the trained, empty index: coarse centroids, an OPQ rotation, PQ codebooks."""
    if not spec.is_ivf:
        return 0
    rotation = 4 * d * d if _rotates(spec) else 0
    return 4 * d * max(spec.nlist, 1) + rotation + (4 * 256 * d if _has_pq(spec) else 0)


def _trains(spec: IndexSpec) -> bool:
    """Whether the index learns from a sample: coarse centroids, codebooks, scalar ranges, rotations."""
    return spec.is_ivf or any(part in spec.factory for part in ("PQ", "SQ", "OPQ", "PCA", "LSH", "RQ"))


def _rotates(spec: IndexSpec) -> bool:
    """Whether a transform (OPQ, PCA) comes first: FAISS then trains and adds on transformed copies."""
    return "OPQ" in spec.factory or "PCA" in spec.factory


def _has_pq(spec: IndexSpec) -> bool:
    return spec.pq_m > 0 or "PQ" in spec.factory


def _code_bytes(spec: IndexSpec, d: int) -> int:
    """Bytes of one vector's code in the lists or graph (the full vector for factory strings: an upper bound)."""
    return int(replace(spec, on_disk=False).bytes_per_vector(d)) - ID_BYTES


def merge_blocks(index: faiss.Index, names: list[str], path: Path) -> int:
    """Merges the lists of the block index files `names` (copies of the trained, empty `index` holding
    some entries) into the on-disk lists file `path`, which `index` then maps; returns the entry count.
    The blocks are memory-mapped, not read, and unmapped afterwards."""
    ivf = faiss.extract_index_ivf(index)
    assert index.ntotal == 0, "blocks merge into an empty index"
    sources = []
    for name in names:
        block = faiss.read_index(name, faiss.IO_FLAG_MMAP)  # lists mapped; the centroids read, then freed
        block_ivf = faiss.extract_index_ivf(block)
        block_ivf.own_invlists = False
        sources.append(faiss.downcast_InvertedLists(block_ivf.invlists))  # the subclass has the destructor
        del block, block_ivf
    vector = faiss.InvertedListsPtrVector()
    for lists in sources:
        vector.push_back(lists)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    with quiet_stdout():
        ntotal = merged.merge_from_multiple(vector.data(), vector.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # owned by `ivf` now
    for lists in sources:  # FAISS's Python layer finds no destructor on these proxies: call it
        type(lists).__swig_destroy__(lists)
    return ntotal


@dataclass
class MemoryPeak:
    """This process's peak resident memory above where it stood on entering, polled by a thread:
    `anon` (RssAnon: heap and other private memory, what a budget bounds) and `total` (VmRSS, which adds
    the pages of memory-mapped files, page cache the kernel can take back)."""

    interval: float = 0.005  # seconds between polls: filling 100 MB of pages takes longer
    anon: int = 0
    total: int = 0

    def __enter__(self) -> "MemoryPeak":
        import threading

        self._base = resident_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = resident_memory()
        self.anon = max(self.anon, now["RssAnon"] - self._base["RssAnon"])
        self.total = max(self.total, now["VmRSS"] - self._base["VmRSS"])


def resident_memory() -> dict[str, int]:
    """Bytes of this process's resident memory by kind (VmRSS, RssAnon, RssFile, RssShmem), from Linux's
    /proc/self/status; OSError elsewhere."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) * 1024
    return out
