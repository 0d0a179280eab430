"""Which FAISS index to build: the named kinds, automatic choice from size and memory, factory strings.

Every index stores L2-normalised vectors under inner product, so scores are cosine similarities.

- ``flat``: exact search (``IndexFlatIP``). The oracle the others are measured against.
- ``hnsw``: a graph (``HNSW{m},Flat``): fast for queries like the indexed vectors, slow to build at
  millions, all in memory, and FAISS cannot delete from it (removed ids become tombstones, see
  `retrieval.index`).
- ``ivf``: inverted lists of full vectors (``IVF{nlist},Flat``): quick to build, deletes, and lists can
  live on disk.
- ``hnswsq``: the same graph over 8-bit scalar-quantised vectors (``HNSW{m}_SQ8``): a quarter of the
  vector memory, same build cost and the same lack of deletes.
- ``ivfsq``: inverted lists of 8-bit scalar-quantised vectors (``IVF{nlist},SQ8``, d bytes each),
  re-ranked with the full vectors on disk: a quarter of IVF-Flat's memory and of the bytes a query
  scans, at nearly its accuracy.
- ``ivfpqfs``: inverted lists of 4-bit PQ codes scanned with SIMD lookup tables (FAISS's "fast scan",
  ``IVF{nlist},PQ{m}x4fs``, ``pq_m / 2`` bytes a code), re-ranked with the full vectors kept on disk.
  Scanning a code costs a fraction of what an 8-bit PQ code costs, so many more candidates are
  affordable. The lists stay in RAM: FAISS's on-disk lists do not hold fast-scan's blocked layout.
- ``ivfpq``: inverted lists of ``pq_m``-byte codes after an OPQ rotation (``OPQ{m}_{d},IVF{nlist},PQ{m}np``),
  re-ranked with the full vectors kept on disk (memory-mapped). ``np``: no polysemous training, which
  only serves Hamming-distance filtering (``polysemous_ht``) that search never turns on, and took 4/5 of
  an IVF-PQ build (IVF64,PQ32 on 20k x 256: 281 s with it, 25 s without, 2 cores). Manifests written
  before keep their factory strings; the indexes they name read and update as before.
- any other FAISS factory string, e.g. ``"IVF1024,SQ8"`` or ``"HNSW16"``.

FAISS's ``Refine(SQfp16)``/``RFlat`` stages are not kinds: they hold the refining vectors in RAM, and
`retrieval.index` already re-ranks from the full vectors memory-mapped on disk (``rerank``), which is
the RFlat stage at no RAM cost.

``auto`` without tuning queries (`choose_spec`) picks exact search for small collections, else the
most accurate kind whose memory fits the budget: IVF-Flat, IVF-SQ8, fast-scan IVF-PQ, and IVF-PQ with
on-disk lists beyond that. A build has tuning queries: it tries the `candidates` on a sample and keeps
the fastest that reaches the target recall within the budgets (`retrieval.plan`). HNSW is never a
candidate: it needs as much memory as IVF-Flat, takes several times longer to build, cannot delete,
and text queries (a distribution the graph was not built on) need a very large efSearch. On a million
clustered 512-d vectors (bench/bench_retrieval.py, 2 quiet cores) IVF4096,Flat reached recall@10 0.96 at
23x the queries/s of exact search; HNSW32 needed efSearch ~2400 for 0.95, only 3x exact (an earlier
session).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, replace

__all__ = [
    "KINDS",
    "IndexSpec",
    "choose_spec",
    "candidates",
    "make_spec",
    "parse_memory",
    "default_memory_budget",
    "format_bytes",
]

KINDS = ("flat", "hnsw", "hnswsq", "ivf", "ivfsq", "ivfpq", "ivfpqfs")
# Below this many vectors exact search answers in a few milliseconds: no approximation needed.
FLAT_MAX_VECTORS = 50_000
# k-means wants at least 39 training points per centroid (FAISS warns below); training time grows with it.
TRAIN_POINTS_PER_LIST = 40
ID_BYTES = 8  # every stored vector carries its int64 id
# The fraction of the budget the index may take: queries, re-ranking and the OS need the rest.
BUDGET_FRACTION = 0.8

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class IndexSpec:
    """A buildable index description; `factory` is the FAISS factory string it builds."""

    kind: str  # one of KINDS, or "factory" for a user's factory string
    factory: str
    nlist: int = 0  # IVF kinds: number of inverted lists
    hnsw_m: int = 0  # hnsw: graph degree
    pq_m: int = 0  # ivfpq: bytes per code
    on_disk: bool = False  # IVF kinds: inverted lists in a memory-mapped file next to the index
    rerank: bool = False  # re-score candidates with the full vectors kept on disk

    def __post_init__(self) -> None:
        if self.kind not in KINDS + ("factory",):
            raise ValueError(f"IndexSpec.kind must be one of {KINDS + ('factory',)}, got {self.kind!r}")
        if self.on_disk and not self.is_ivf:
            raise ValueError(f"on_disk=True needs an IVF index, got {self.factory!r}; use kind 'ivf' or 'ivfpq'")
        if self.on_disk and self.fast_scan:
            raise ValueError(
                f"on_disk=True is not possible for {self.factory!r}: FAISS's on-disk lists cannot hold fast-scan "
                "codes; use kind 'ivfpq' for on-disk lists, or keep the lists in memory"
            )

    @property
    def is_ivf(self) -> bool:
        """Whether the index has inverted lists (and so an `nprobe` knob and optional on-disk lists)."""
        return self.nlist > 0 or "IVF" in self.factory

    @property
    def is_hnsw(self) -> bool:
        """Whether the index is an HNSW graph (an `ef_search` knob, deletes as tombstones)."""
        return self.kind in ("hnsw", "hnswsq") or self.factory.startswith("HNSW")

    @property
    def fast_scan(self) -> bool:
        """Whether the codes are 4-bit fast-scan PQ (in-memory lists only)."""
        return re.search(r"x4fsr?(,|$)", self.factory) is not None

    def bytes_per_vector(self, d: int) -> float:
        """Memory each vector costs in RAM (on-disk lists and the re-ranking store are not in RAM)."""
        if self.on_disk:
            return 0.0
        if self.kind == "ivfpq":
            return self.pq_m + ID_BYTES
        if self.kind == "ivfpqfs":
            return math.ceil(self.pq_m / 2) + ID_BYTES
        if self.kind == "ivfsq":
            return d + ID_BYTES
        if self.is_hnsw and self.kind != "factory":
            links = 2 * self.hnsw_m * 4 * 1.05  # level 0 keeps 2m int32 links, upper levels ~5%
            return (d if self.kind == "hnswsq" else 4 * d) + ID_BYTES + links
        return 4 * d + ID_BYTES

    def to_dict(self) -> dict:
        """The fields as a dict, as the manifest records them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IndexSpec":
        """The spec `to_dict` wrote; ValueError for a bad kind or on_disk setting."""
        return cls(**data)


def make_spec(
    kind: str,
    n: int,
    d: int,
    *,
    memory_budget: int | None = None,
    on_disk: bool | None = None,
    hnsw_m: int = 32,
    pq_m: int | None = None,
) -> IndexSpec:
    """The spec for `kind` ("auto", one of KINDS, or a FAISS factory string) and `n` vectors of dimension `d`."""
    if n < 0 or d <= 0:
        raise ValueError(f"need n >= 0 vectors of positive dimension, got n={n}, d={d}")
    if kind == "auto":
        spec = choose_spec(n, d, memory_budget if memory_budget is not None else default_memory_budget())
        return replace(spec, on_disk=on_disk) if on_disk is not None and spec.is_ivf else spec
    if kind == "flat":
        spec = IndexSpec("flat", "Flat")
    elif kind == "hnsw":
        spec = IndexSpec("hnsw", f"HNSW{hnsw_m},Flat", hnsw_m=hnsw_m)
    elif kind == "hnswsq":
        spec = IndexSpec("hnswsq", f"HNSW{hnsw_m}_SQ8", hnsw_m=hnsw_m)
    elif kind == "ivfpqfs":
        spec = _fast_scan(n, d, pq_m or default_fast_scan_m(d))
    elif kind == "ivfsq":
        nlist = default_nlist(n)
        spec = IndexSpec("ivfsq", f"IVF{nlist},SQ8", nlist=nlist, rerank=True)
    elif kind == "ivf":
        nlist = default_nlist(n)
        spec = IndexSpec("ivf", f"IVF{nlist},Flat", nlist=nlist)
    elif kind == "ivfpq":
        spec = _ivfpq(n, d, pq_m or default_pq_m(d))
    else:
        spec = _factory_spec(kind, d)
    return replace(spec, on_disk=bool(on_disk)) if on_disk is not None else spec


def choose_spec(n: int, d: int, memory_budget: int) -> IndexSpec:
    """`auto` without trials: the first of `candidates` (see module docstring)."""
    return candidates(n, d, memory_budget)[0]


def candidates(n: int, d: int, memory_budget: int) -> list[IndexSpec]:
    """The kinds `auto` may build for `n` vectors of dimension `d` within `memory_budget` bytes, most
    accurate first: exact search alone for small collections; else those of IVF-Flat, IVF-SQ8 and a compact
    kind that fit; IVF-PQ with on-disk lists when none does. The compact kind is OPQ + IVF-PQ with codes as
    short as fast scan's where that fits and has the vectors to train 8-bit codes, else fast-scan IVF-PQ
    (for odd d, IVF-PQ): at equal bytes 8-bit OPQ codes rank better than 4-bit ones and need fewer
    candidates re-ranked (1M x 512, 16-byte codes: 320 against 1,280 for recall@10 0.96, 3.2x the queries
    a second), which trials on a 50,000-vector sample cannot see (both re-rank 160 or 320 there)."""
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}; pass e.g. '4G'")
    room = memory_budget * BUDGET_FRACTION
    if n <= FLAT_MAX_VECTORS and n * (4 * d + ID_BYTES) <= room:
        return [IndexSpec("flat", "Flat")]
    nlist = default_nlist(n)
    specs = [IndexSpec("ivf", f"IVF{nlist},Flat", nlist=nlist), make_spec("ivfsq", n, d)]
    pq = _ivfpq(n, d, default_pq_m(d))
    if d % 2 == 0:  # fast scan pairs 4-bit codes
        fast = _fast_scan(n, d, default_fast_scan_m(d))
        short = _ivfpq(n, d, fast.pq_m // 2)
        specs += [short, fast] if short.factory.startswith("OPQ") else [fast]
    else:
        specs.append(pq)
    fit = [
        s
        for s in specs
        if n * (s.bytes_per_vector(d) + 4 * d * s.nlist / max(n, 1)) <= room and _buildable(s, n, d, memory_budget)
    ]
    if any(s.kind == "ivfpq" for s in fit):  # one compact kind: fast scan only where OPQ codes do not fit
        fit = [s for s in fit if not s.fast_scan]
    return fit or [replace(pq, on_disk=True)]


def _buildable(spec: IndexSpec, n: int, d: int, memory_budget: int) -> bool:
    """Whether building `spec` (its training sample and blocks, not only the finished index) fits the budget."""
    from .ondisk import plan_build  # sizes builds of these kinds: imports this module

    try:
        plan_build(spec, n, d, memory_budget)
    except ValueError:
        return False
    return True


def default_nlist(n: int) -> int:
    """A power of two near 4 sqrt(n) (FAISS's guideline), with enough points per list to train k-means."""
    if n < 2 * TRAIN_POINTS_PER_LIST:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(target))
    while nlist > 1 and n < nlist * TRAIN_POINTS_PER_LIST:
        nlist //= 2
    return nlist


def default_pq_m(d: int) -> int:
    """Bytes per PQ code: 32 at most, so that code, 8-byte id and the share of the coarse centroids and
    OPQ matrix stay within 64 bytes a vector at a million vectors; at most d / 4."""
    for m in (32, 16, 8, 4, 2, 1):
        if m <= max(1, d // 4):
            return m
    return 1


def default_fast_scan_m(d: int) -> int:
    """4-bit sub-quantizers for fast scan: one per 16 dimensions (32 on d=512: 16 bytes a code, 24 with the
    id), at least min(16, d / 2) (fewer, and 16 centroids each cannot tell neighbours apart even after
    re-ranking: 4 on d=32 left recall@10 at 0.58 with 160 candidates re-ranked, 16 gave 0.997) and at most
    64; an even divisor of d (FAISS packs codes in pairs). Re-ranking makes up for the coarse codes: on
    1M clustered 512-d vectors IVF4096,PQ32x4fs reached recall@10 0.977 with 16 lists visited and 1280
    candidates re-ranked (0.93 with 640), in 33.5 bytes a vector with the coarse centroids' share."""
    for m in range(min(64, max(d // 16, min(16, d // 2))), 1, -1):
        if d % m == 0 and m % 2 == 0:
            return m
    return 2


def _fast_scan(n: int, d: int, m: int) -> IndexSpec:
    if m <= 0 or m > d or d % m:
        raise ValueError(f"pq_m must divide the dimension {d} for fast-scan PQ, got {m}; e.g. {default_fast_scan_m(d)}")
    nlist = default_nlist(n)
    return IndexSpec("ivfpqfs", f"IVF{nlist},PQ{m}x4fs", nlist=nlist, pq_m=m, rerank=True)


def _ivfpq(n: int, d: int, m: int) -> IndexSpec:
    if m <= 0 or m > d:
        raise ValueError(f"pq_m must be in 1..{d} (bytes per code), got {m}")
    nlist = default_nlist(n)
    if n >= 256 * TRAIN_POINTS_PER_LIST:
        d_out = (d // m) * m  # the OPQ rotation also reduces to a multiple of m dimensions
        return IndexSpec("ivfpq", f"OPQ{m}_{d_out},IVF{nlist},PQ{m}np", nlist=nlist, pq_m=m, rerank=True)
    # Too few vectors to train 256 centroids per sub-quantizer (OPQ always uses 256): 16 centroids, no
    # rotation. Re-ranking with the full vectors makes up for the coarser codes.
    return IndexSpec("ivfpq", f"IVF{nlist},PQ{m}x4np", nlist=nlist, pq_m=m, rerank=True)


def _factory_spec(factory: str, d: int) -> IndexSpec:
    import faiss

    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(
            f"unknown index kind or bad FAISS factory string {factory!r} ({_first_line(err)}); use one of "
            f"auto, {', '.join(KINDS)} or a factory string such as 'IVF1024,Flat' or 'HNSW32'"
        ) from err
    ivf = faiss.try_extract_index_ivf(index)
    return IndexSpec("factory", factory, nlist=ivf.nlist if ivf is not None else 0)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1][:200]


def parse_memory(value: str | int) -> int:
    """'4G', '512M', '1.5GB', '2GiB' or a number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"memory budget must be positive, got {value}")
        return value
    match = _MEMORY.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"cannot read memory size {value!r}: use a positive number with an optional unit, e.g. 4G or 512M"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def default_memory_budget() -> int:
    """Half the machine's physical memory: the other half stays for the model, queries and the OS."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def format_bytes(n: float) -> str:
    """A byte count for people, in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
