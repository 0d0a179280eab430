"""Results without near-duplicates, and MMR re-ranking: what `SearchIndex.search_*(dedup=..., mmr=...)`,
`vlm search --dedup/--mmr` and the service's `dedup=`/`mmr=` do.

    index.search_text("a red car", k=10, dedup=0.95)          # drop results >= 0.95 cosine to a better one
    index.search_text("a red car", k=10, mmr=0.5)             # maximal marginal relevance, lambda 0.5

Dedup is greedy over the results, best-scored first: a result is dropped when its stored vector has cosine
>= the threshold with a result already kept. Unlike clip-retrieval's clip-back, which drops every member
but the best of each connected component (threshold 0.94), a result is never dropped for resembling a
result that was itself dropped, so every dropped result repeats one that is shown.

MMR (Carbonell and Goldstein, 1998) picks, one at a time, the candidate maximising
``lambda * score - (1 - lambda) * max cosine to the results already picked``: lambda 1 is the plain
ranking, lower values trade relevance for variety. Results come in the order MMR picked them, so their
scores need not decrease. With both, near-duplicates go first and MMR picks among the best
`first_fetch(k)` of the rest (as many candidates as MMR alone has).

Both work on over-fetched candidates: `first_fetch(k)` = max(k * FETCH_FACTOR, MIN_FETCH) first, then
FETCH_FACTOR times more while fewer than k remain and the index has more to give, up to
`max(MAX_CANDIDATES, first_fetch(k))` candidates.
When fewer than k distinct results remain even then, fewer than k are returned (the rows of `D`, `I` are
padded with -inf and -1, as for a filter that matches fewer than k items). The vectors compared are the
index's stored full vectors, not its compressed codes; filters (`where`, `ids`) apply to the candidates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

from .index import Neighbors, SearchParams, VectorIndex

__all__ = [
    "Diversity",
    "dedup_positions",
    "mmr_positions",
    "select_positions",
    "diverse_search",
    "first_fetch",
    "FETCH_FACTOR",
    "MIN_FETCH",
    "MAX_CANDIDATES",
]

logger = logging.getLogger(__name__)

FETCH_FACTOR = 4
MIN_FETCH = 64  # for a small k, more candidates cost little and spare a second search
MAX_CANDIDATES = 4096  # bounds the work per query: dedup and MMR cost up to O(k * candidates * d)
# Identical unit vectors can score 1 - 1.2e-7 in float32: a threshold of 1 must still catch them.
COSINE_TOLERANCE = 1e-6
_BLOCK = 256  # candidates compared with the kept ones per matrix product
_GRAM_MAX = 8192  # MMR keeps all pairwise cosines up to this many candidates (256 MiB)
_GRAM_PICKS = 8  # ... once it picks at least 1/8 of them: a product runs ~10x faster per cosine than a pass


@dataclass(frozen=True)
class Diversity:
    """What to do to the ranking: drop near-duplicates (`dedup`), re-rank by MMR (`mmr`), both or neither.
    ValueError (TypeError for a non-number) naming the bad value when one is out of range."""

    dedup: float | None = None  # cosine at or above which a result repeats a better one; e.g. 0.95
    mmr: float | None = None  # MMR's lambda: 1 ranks by relevance only, 0 by variety only; e.g. 0.5

    def __post_init__(self) -> None:
        if self.dedup is not None:
            _check_number("dedup", self.dedup)
            if not 0 < self.dedup <= 1:
                raise ValueError(
                    f"dedup must be a cosine similarity in (0, 1] (a result this similar to a better one is dropped; "
                    f"e.g. 0.95, or 1 for identical vectors only), got {self.dedup!r}"
                )
        if self.mmr is not None:
            _check_number("mmr", self.mmr)
            if not 0 <= self.mmr <= 1:
                raise ValueError(
                    f"mmr must be MMR's lambda in [0, 1] (1 ranks by relevance only, 0 by variety only; e.g. 0.5), "
                    f"got {self.mmr!r}"
                )

    @property
    def active(self) -> bool:
        """Whether the ranking changes at all."""
        return self.dedup is not None or self.mmr is not None


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# ---- pure functions over one query's candidates ----------------------------------------------------
def dedup_positions(scores: np.ndarray, vectors: np.ndarray, threshold: float, limit: int | None = None) -> np.ndarray:
    """Positions (into `scores`, (m,), and `vectors`, (m, d)) of the candidates to keep, best-scored first
    (ties in input order): each one's cosine with every kept one is below `threshold`. Stops after `limit`."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    unit = _unit(vectors)[order]
    room = len(order) if limit is None else min(limit, len(order))
    cut = threshold - COSINE_TOLERANCE
    kept: list[int] = []  # into `order`
    # Blocks of candidates meet the kept ones in one matrix product each; only the greedy walk inside a
    # block is sequential, so the work is BLAS's, not Python's.
    for start in range(0, len(order), _BLOCK):
        block = unit[start : start + _BLOCK]
        repeats = (block @ unit[kept].T).max(axis=1) >= cut if kept else np.zeros(len(block), dtype=bool)
        inner = block @ block.T  # (B, B)
        fresh: list[int] = []
        for i in np.nonzero(~repeats)[0]:
            if len(kept) + len(fresh) == room:
                break
            if not fresh or inner[i, fresh].max() < cut:
                fresh.append(int(i))
        kept += [start + i for i in fresh]
        if len(kept) == room:
            break
    return order[np.asarray(kept, dtype=np.int64)]


def mmr_positions(scores: np.ndarray, vectors: np.ndarray, lam: float, k: int) -> np.ndarray:
    """Positions of min(k, m) candidates in the order maximal marginal relevance picks them: each step
    takes the one maximising `lam * score - (1 - lam) * (max cosine to those already picked)`; ties go to
    the better score."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")  # argmax takes the first of equals: the better-scored
    relevance, unit = scores[order], _unit(vectors)[order]
    # For many picks, all cosines at once (one matrix product) beat a pass over the vectors per pick.
    gram = unit @ unit.T if _GRAM_PICKS * min(k, len(unit)) >= len(unit) and len(unit) <= _GRAM_MAX else None
    closest = np.zeros(len(order))  # max cosine to the picked ones; no penalty before the first pick
    free = np.ones(len(order), dtype=bool)
    picked: list[int] = []
    for _ in range(min(k, len(order))):
        value = np.where(free, lam * relevance - (1 - lam) * closest, -np.inf)
        j = int(np.argmax(value))
        sims = gram[j] if gram is not None else unit @ unit[j]
        closest = sims if not picked else np.maximum(closest, sims)
        picked.append(j)
        free[j] = False
    return order[np.asarray(picked, dtype=np.int64)]


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (stored vectors already are; this keeps the functions honest cosines)."""
    xb = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(xb, axis=1, keepdims=True)
    return xb / np.where(norms > 0, norms, 1)


def select_positions(scores: np.ndarray, vectors: np.ndarray, k: int, diversity: Diversity) -> np.ndarray:
    """Positions of the at most k candidates `diversity` keeps, in the order they are shown."""
    positions = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    if diversity.dedup is not None:
        # MMR to follow picks among as many distinct candidates as it has without dedup.
        limit = k if diversity.mmr is None else first_fetch(k)
        positions = dedup_positions(scores, vectors, diversity.dedup, limit)
    if diversity.mmr is not None:
        positions = positions[mmr_positions(scores[positions], vectors[positions], diversity.mmr, k)]
    return positions[:k]


# ---- over-fetching search ----------------------------------------------------------------------------
def first_fetch(k: int) -> int:
    """Candidates fetched first for k results (see the module docstring)."""
    return max(k * FETCH_FACTOR, MIN_FETCH)


def diverse_search(
    index: VectorIndex,
    xq: np.ndarray,
    k: int,
    diversity: Diversity,
    *,
    allowed: np.ndarray | None = None,
    params: SearchParams | None = None,
) -> Neighbors:
    """`index.search(xq, k, ...)` with `diversity` applied to over-fetched candidates (see the module
    docstring): (nq, k) arrays, rows padded with -inf / -1 when fewer than k results remain."""
    if index.vectors is None:
        raise ValueError("dedup and mmr compare the results' stored vectors, and this index keeps none; rebuild it")
    D = np.full((len(xq), k), -np.inf, dtype=np.float32)
    I = np.full((len(xq), k), -1, dtype=np.int64)
    fetch = first_fetch(k)
    cap = max(MAX_CANDIDATES, fetch)
    pending = np.arange(len(xq))
    while len(pending):
        found = index.search(xq[pending], fetch, allowed=allowed, params=params)
        short = []
        for row, q in enumerate(pending):
            valid = found.I[row] >= 0
            ids, scores = found.I[row][valid], found.D[row][valid]
            keep = select_positions(scores, index.vectors.get(ids), k, diversity)
            D[q, : len(keep)], I[q, : len(keep)] = scores[keep], ids[keep]
            if len(keep) < k and valid.all() and fetch < cap:  # more candidates exist: look further
                short.append(q)
        pending, fetch = np.asarray(short, dtype=np.int64), min(fetch * FETCH_FACTOR, cap)
    short_rows = int((I[:, -1] < 0).sum())
    if short_rows:
        logger.debug("%d of %d queries have fewer than %d distinct results", short_rows, len(xq), k)
    return Neighbors(D, I)
